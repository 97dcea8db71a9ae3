//! `secctl session …`: list, revoke, log out everywhere, statistics, and backup/restore
//! of every live session (admin token).
//!
//! Backup file: `SECSESS1\n`, then sealed chunks, each `u32` big-endian length ‖ a blob
//! sealed by crypto-svc envelope encryption (AES-256-GCM under a data key of the backup
//! key) holding up to [`CHUNK_SESSIONS`] length-delimited `ExportedSession` messages.
//! Each chunk's associated data names its position, and a last sealed chunk carries the
//! total count, so reordered, dropped or truncated chunks are refused on restore.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use futures::StreamExt as _;
use prost::Message as _;
use sec_common::config::Config;
use sec_common::envelope::{CachePolicy, Envelope};
use sec_common::grpc::{BearerToken, channel};
use sec_proto::crypto::v1::{CreateKeyRequest, GetKeyRequest, KeyType};
use sec_proto::session::v1::session_service_client::SessionServiceClient;
use sec_proto::session::v1::{
    ExportSessionsRequest, ExportedSession, ImportSessionsResponse, ListForUserRequest,
    RevokeAllForUserRequest, RevokeRequest, Session, SessionStatsRequest, revoke_request,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::SessionCommand;
use crate::output::{Output, print_json, time};
use crate::rpc::{CryptoClient, Rpc as _, authed_channel, endpoint};

pub type SessionClient = SessionServiceClient<InterceptedService<Channel, BearerToken>>;

const MAGIC: &[u8] = b"SECSESS1\n";
/// Sessions per sealed chunk (a chunk is at most a few MiB).
pub const CHUNK_SESSIONS: usize = 1000;
/// Largest sealed chunk accepted on restore.
const MAX_CHUNK_BYTES: usize = 64 * 1024 * 1024;
/// The crypto-svc key backups are sealed under unless `--key` says otherwise.
pub const DEFAULT_KEY: &str = "session-backup";

/// What backup and restore talk to.
pub struct Clients {
    pub session: SessionClient,
    pub crypto: CryptoClient,
    pub crypto_channel: Channel,
    pub token: String,
}

impl Clients {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let token = sec_common::auth::client_token(&config.data_dir)
            .context("no token: set SEC_TOKEN or run where the data directory holds admin.token")?;
        Ok(Self {
            session: SessionServiceClient::new(authed_channel(config, "session")?),
            crypto: crate::rpc::crypto(config)?,
            crypto_channel: channel(&endpoint(config, "crypto")?, &config.tls)?,
            token,
        })
    }
}

fn aad(index: u64) -> Vec<u8> {
    format!("sec-session-backup:v1:chunk:{index}").into_bytes()
}

fn end_aad(chunks: u64) -> Vec<u8> {
    format!("sec-session-backup:v1:end:{chunks}").into_bytes()
}

/// Creates the AES-256-GCM backup key if it does not exist yet.
async fn ensure_key(crypto: &mut CryptoClient, key: &str) -> anyhow::Result<()> {
    match crypto.get_key(GetKeyRequest { name: key.into() }).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => {
            crypto
                .create_key(CreateKeyRequest {
                    name: key.into(),
                    r#type: KeyType::Aes256Gcm as i32,
                    config: None,
                })
                .await
                .rpc()?;
            Ok(())
        }
        Err(s) => Err(crate::rpc::RpcError(s).into()),
    }
}

fn envelope(c: &Clients, key: &str) -> anyhow::Result<Envelope> {
    Envelope::new(
        c.crypto_channel.clone(),
        Some(&c.token),
        key,
        CachePolicy::default(),
    )
}

/// Seals `plain` and appends it, length first, to `out`.
async fn seal_into(
    env: &Envelope,
    plain: &[u8],
    aad: &[u8],
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let sealed = env.seal(plain, aad).await?;
    out.extend_from_slice(&u32::try_from(sealed.len())?.to_be_bytes());
    out.extend_from_slice(&sealed);
    Ok(())
}

/// Streams every live session into `path` (written atomically, mode 0600); the count.
pub async fn backup(c: &mut Clients, key: &str, path: &Path) -> anyhow::Result<u64> {
    ensure_key(&mut c.crypto, key).await?;
    let env = envelope(c, key)?;
    let mut stream = c
        .session
        .export_sessions(ExportSessionsRequest {})
        .await
        .rpc()?;
    let mut out = MAGIC.to_vec();
    let (mut total, mut chunks) = (0_u64, 0_u64);
    let mut buf = Vec::new();
    let mut in_chunk = 0;
    while let Some(item) = stream.message().await.map_err(crate::rpc::RpcError)? {
        item.encode_length_delimited(&mut buf)?;
        in_chunk += 1;
        total += 1;
        if in_chunk == CHUNK_SESSIONS {
            seal_into(&env, &std::mem::take(&mut buf), &aad(chunks), &mut out).await?;
            chunks += 1;
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        seal_into(&env, &std::mem::take(&mut buf), &aad(chunks), &mut out).await?;
        chunks += 1;
    }
    seal_into(&env, &total.to_be_bytes(), &end_aad(chunks), &mut out).await?;
    sec_common::fsutil::write_secret_atomic(path, &out)?;
    Ok(total)
}

/// The sealed chunks of a backup file, checked for shape.
fn chunks_of(bytes: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .context("not a session backup file")?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_at_checked(4).context("truncated backup file")?;
        let n = usize::try_from(u32::from_be_bytes(len.try_into()?))?;
        anyhow::ensure!(n <= MAX_CHUNK_BYTES, "backup chunk too large");
        let (chunk, tail) = tail.split_at_checked(n).context("truncated backup file")?;
        out.push(chunk);
        rest = tail;
    }
    anyhow::ensure!(!out.is_empty(), "truncated backup file");
    Ok(out)
}

/// Loads a backup back; sessions expired since the backup are skipped.
pub async fn restore(
    c: &mut Clients,
    key: &str,
    path: &Path,
) -> anyhow::Result<ImportSessionsResponse> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    let chunks = chunks_of(&bytes)?;
    let env = envelope(c, key)?;
    let (last, data) = chunks.split_last().context("truncated backup file")?;
    let n = u64::try_from(data.len())?;
    let end = env
        .open(last, &end_aad(n))
        .await
        .context("backup file is truncated, reordered or not sealed under this key")?;
    let total = u64::from_be_bytes(end.as_slice().try_into().context("bad backup trailer")?);
    let mut sessions = Vec::new();
    for (i, chunk) in data.iter().enumerate() {
        let plain = env
            .open(chunk, &aad(u64::try_from(i)?))
            .await
            .context("backup chunk failed authentication")?;
        let mut buf = plain.as_slice();
        while !buf.is_empty() {
            sessions.push(ExportedSession::decode_length_delimited(&mut buf)?);
        }
    }
    anyhow::ensure!(
        u64::try_from(sessions.len())? == total,
        "backup holds {} sessions, its trailer says {total}",
        sessions.len()
    );
    let r = c
        .session
        .import_sessions(futures::stream::iter(sessions).boxed())
        .await
        .rpc()?;
    Ok(r)
}

fn session_json(s: &Session) -> serde_json::Value {
    serde_json::json!({
        "handle": s.handle,
        "user_id": s.user_id,
        "client_id": s.client_id,
        "amr": s.amr,
        "acr": s.acr,
        "created_at": time(s.created_at.as_ref()),
        "last_seen_at": time(s.last_seen_at.as_ref()),
        "expires_at": time(s.expires_at.as_ref()),
        "absolute_expires_at": time(s.absolute_expires_at.as_ref()),
        "source_ip": s.source_ip,
        "user_agent": s.user_agent,
    })
}

pub async fn run(config: &Config, output: Output, cmd: SessionCommand) -> anyhow::Result<ExitCode> {
    let mut c = Clients::from_config(config)?;
    match cmd {
        SessionCommand::List { user } => {
            let list = c
                .session
                .list_for_user(ListForUserRequest { user_id: user })
                .await
                .rpc()?
                .sessions;
            match output {
                Output::Json => {
                    print_json(&list.iter().map(session_json).collect::<Vec<_>>().into())?
                }
                Output::Table => {
                    println!(
                        "{:<64}  {:<16}  {:<20}  {:<20}  source_ip",
                        "handle", "client", "last_seen", "expires"
                    );
                    for s in &list {
                        println!(
                            "{:<64}  {:<16}  {:<20}  {:<20}  {}",
                            s.handle,
                            s.client_id,
                            time(s.last_seen_at.as_ref()),
                            time(s.expires_at.as_ref()),
                            s.source_ip
                        );
                    }
                }
            }
        }
        SessionCommand::Revoke { handle } => {
            let r = c
                .session
                .revoke(RevokeRequest {
                    target: Some(revoke_request::Target::Handle(handle)),
                })
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({ "revoked": r.revoked }))?,
                Output::Table => println!("revoked {}", r.revoked),
            }
        }
        SessionCommand::RevokeUser { user } => {
            let r = c
                .session
                .revoke_all_for_user(RevokeAllForUserRequest { user_id: user })
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({ "revoked": r.revoked }))?,
                Output::Table => println!("revoked {}", r.revoked),
            }
        }
        SessionCommand::Stats => {
            let s = c
                .session
                .session_stats(SessionStatsRequest {})
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "active": s.active,
                    "clients": s.clients.iter().map(|c| (c.client_id.clone(), c.active)).collect::<std::collections::BTreeMap<_, _>>(),
                    "created": s.created,
                    "expired": s.expired,
                    "revoked": s.revoked,
                    "rotated": s.rotated,
                    "binding_violations": s.binding_violations,
                    "evictions": s.evictions,
                }))?,
                Output::Table => {
                    println!("active sessions: {}", s.active);
                    for cc in &s.clients {
                        println!("  {:<32} {}", cc.client_id, cc.active);
                    }
                    println!(
                        "since start of this replica: created {}, expired {}, revoked {}, rotated {}, binding violations {}, evictions {}",
                        s.created,
                        s.expired,
                        s.revoked,
                        s.rotated,
                        s.binding_violations,
                        s.evictions
                    );
                }
            }
        }
        SessionCommand::Backup { file, key } => {
            let n = backup(&mut c, &key, &file).await?;
            match output {
                Output::Json => print_json(
                    &serde_json::json!({ "sessions": n, "file": file.display().to_string() }),
                )?,
                Output::Table => eprintln!("{n} sessions written to {}", file.display()),
            }
        }
        SessionCommand::Restore { file, key } => {
            let r = restore(&mut c, &key, &file).await?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "imported": r.imported,
                    "skipped_expired": r.skipped_expired,
                    "skipped_existing": r.skipped_existing,
                }))?,
                Output::Table => println!(
                    "imported {}, skipped {} expired and {} already present",
                    r.imported, r.skipped_expired, r.skipped_existing
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use deadpool_redis::redis;
    use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
    use sec_proto::session::v1::{CreateRequest, GetRequest};
    use sec_tests::{Backends, TestPlatform};
    use session_svc::SessionConfig;
    use session_svc::config::ClientTimeouts;

    fn clients(tp: &TestPlatform) -> Clients {
        let admin = || tp.admin_bearer().unwrap();
        Clients {
            session: SessionServiceClient::with_interceptor(tp.channel("session"), admin()),
            crypto: CryptoServiceClient::with_interceptor(tp.channel("crypto"), admin()),
            crypto_channel: tp.channel("crypto"),
            token: tp.token.clone(),
        }
    }

    /// Deletes every key of this run's session prefix (a flush limited to this test, so
    /// the shared Redis keeps everyone else's data).
    async fn flush(tp: &TestPlatform) {
        let url = tp.config.storage.redis_url.as_ref().unwrap().expose();
        let mut conn = sec_common::storage::RedisPool::from_url(url)
            .unwrap()
            .get()
            .await
            .unwrap();
        let pattern = format!("{}session:*", tp.config.storage.redis_key_prefix);
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty());
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backup_flush_restore_round_trip_on_redis() {
        let Some(mut seed) = TestPlatform::seed(Backends::Production) else {
            return;
        };
        let mut cfg = seed
            .config
            .section::<SessionConfig>(session_svc::NAME)
            .unwrap()
            .clone();
        cfg.clients.insert(
            "short".into(),
            ClientTimeouts {
                idle_timeout_seconds: 1,
                absolute_lifetime_seconds: 1,
            },
        );
        cfg.max_sessions_per_user = 1000;
        seed.config.set_section(session_svc::NAME, cfg).unwrap();
        let tp = TestPlatform::start_with(seed, None).await;
        let mut c = clients(&tp);
        let mut ids = Vec::new();
        // More than one chunk.
        for i in 0..(CHUNK_SESSIONS + 5) {
            let r = c
                .session
                .create(CreateRequest {
                    user_id: format!("user{}", i % 7),
                    client_id: "web".into(),
                    source_ip: "192.0.2.1".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            ids.push(r.session_id);
        }
        c.session
            .create(CreateRequest {
                user_id: "brief".into(),
                client_id: "short".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sessions.bak");
        let n = backup(&mut c, DEFAULT_KEY, &file).await.unwrap();
        assert_eq!(n, u64::try_from(CHUNK_SESSIONS).unwrap() + 6);
        let raw = std::fs::read(&file).unwrap();
        assert!(
            !raw.windows(9).any(|w| w == b"192.0.2.1"),
            "the backup is encrypted"
        );

        flush(&tp).await;
        let get = |id: &str| GetRequest {
            session_id: id.into(),
            ..Default::default()
        };
        assert_eq!(
            c.session.get(get(&ids[0])).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        // The 1-second session expires meanwhile.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let r = restore(&mut c, DEFAULT_KEY, &file).await.unwrap();
        assert_eq!(r.imported, u64::try_from(CHUNK_SESSIONS).unwrap() + 5);
        assert_eq!(r.skipped_expired, 1);
        for id in [&ids[0], &ids[CHUNK_SESSIONS + 4]] {
            let s = c.session.get(get(id)).await.unwrap().into_inner();
            assert_eq!(s.session.unwrap().source_ip, "192.0.2.1");
        }
        let again = restore(&mut c, DEFAULT_KEY, &file).await.unwrap();
        assert_eq!(
            again.skipped_existing,
            u64::try_from(CHUNK_SESSIONS).unwrap() + 5
        );

        // A truncated or tampered file is refused before anything is imported.
        let cut = dir.path().join("cut.bak");
        let chunks = chunks_of(&raw).unwrap();
        let keep = raw.len() - chunks.last().unwrap().len() - 4;
        std::fs::write(&cut, &raw[..keep]).unwrap();
        assert!(restore(&mut c, DEFAULT_KEY, &cut).await.is_err());
        let mut bad = raw.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        std::fs::write(&cut, &bad).unwrap();
        assert!(restore(&mut c, DEFAULT_KEY, &cut).await.is_err());
        let _ = tp.stop().await;
    }
}

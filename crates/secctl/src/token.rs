//! `secctl token inspect|revoke|stats`: tokens of token-svc.
//!
//! A token is a credential: it is read from stdin when the argument is omitted or `-`
//! (keeping it out of shell history and the process list), never logged, and `inspect`
//! prints only what the token itself carries.

use std::io::Write as _;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use sec_common::config::Config;
use sec_proto::token::v1::token_service_client::TokenServiceClient;
use sec_proto::token::v1::{
    ClientTokenStats, InvalidReason, RevokeTokenRequest, TokenKind, TokenStatsRequest,
    ValidateTokenRequest, revoke_token_request::Target,
};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::parse_duration;
use crate::output::{Output, time};
use crate::rpc::{Rpc as _, authed_channel, read_text_input};

pub type TokenClient =
    TokenServiceClient<InterceptedService<Channel, sec_common::grpc::BearerToken>>;

/// Longest token `inspect` decodes (token-svc's default limit is 8 KiB).
const MAX_INSPECT_BYTES: usize = 64 * 1024;
/// `token stats --window` is at most a day (token-svc's bound).
const MAX_WINDOW_SECS: u64 = 24 * 3600;

pub fn client(config: &Config) -> anyhow::Result<TokenClient> {
    Ok(TokenServiceClient::new(authed_channel(config, "token")?))
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Decode a JWT's header and claims locally, WITHOUT verifying them; `--validate`
    /// asks token-svc (ValidateToken) whether it is valid and why not.
    Inspect {
        /// The token; omitted or `-`: read from stdin.
        token: Option<String>,
        /// Also validate it with token-svc.
        #[arg(long)]
        validate: bool,
        /// Kind to validate as.
        #[arg(long, value_enum, default_value_t = KindArg::Access)]
        kind: KindArg,
        /// Audience to validate for (default: token-svc's default audience; ID tokens:
        /// the client id).
        #[arg(long)]
        audience: Option<String>,
    },
    /// Revoke by jti, subject, client, refresh family or whole token.
    Revoke(RevokeArgs),
    /// Issued, refreshed, validated and rejected counts per client over a window.
    Stats {
        /// Window (e.g. 1h, 30m, 24h; at most 24h). Default: the last hour.
        #[arg(long, value_parser = parse_window)]
        window: Option<u64>,
        /// Only this client.
        #[arg(long)]
        client: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Access,
    Id,
}

#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
pub struct RevokeArgs {
    /// An access or ID token's jti.
    #[arg(long, group = "target")]
    pub jti: Option<String>,
    /// Every token of this subject issued up to now.
    #[arg(long, group = "target")]
    pub subject: Option<String>,
    /// Every token of this client issued up to now.
    #[arg(long, group = "target")]
    pub client: Option<String>,
    /// A refresh-token family.
    #[arg(long, group = "target")]
    pub family: Option<String>,
    /// A whole access/ID token (`-`: read it from stdin); its jti and exp come from it.
    #[arg(long, group = "target", value_name = "TOKEN|-")]
    pub token: Option<String>,
    /// A refresh token (`-`: read it from stdin): its family is revoked.
    #[arg(long, group = "target", value_name = "TOKEN|-")]
    pub refresh_token: Option<String>,
    /// With --jti: when the denylist entry may go (RFC 3339; default: the longest access
    /// lifetime).
    #[arg(long, value_parser = parse_time, conflicts_with_all = ["subject", "client", "family", "token", "refresh_token"])]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why (recorded in the event).
    #[arg(long, default_value = "")]
    pub reason: String,
}

fn parse_window(s: &str) -> Result<u64, String> {
    let secs = parse_duration(s)?;
    if secs == 0 || secs > MAX_WINDOW_SECS {
        return Err(format!("`{s}`: the window is 1s to 24h"));
    }
    Ok(secs)
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("`{s}`: not an RFC 3339 time ({e})"))
}

/// Writes to stdout; a reader that went away (`| head`) ends the command quietly.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

pub fn emit_json(v: &Value) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

/// A token argument, or stdin for `None` / `-`.
async fn token_arg(arg: Option<String>, what: &str) -> anyhow::Result<String> {
    match arg.as_deref() {
        None | Some("-") => read_text_input(None, what).await,
        Some(t) => Ok(t.trim().to_owned()),
    }
}

/// `INVALID_REASON_WRONG_AUDIENCE` → `wrong_audience`.
pub fn reason_name(r: i32) -> String {
    InvalidReason::try_from(r)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("INVALID_REASON_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("unknown({r})"))
}

/// The local, unverified view of a token.
pub fn inspect_json(token: &str) -> anyhow::Result<Value> {
    let (header, claims) = sec_common::jwt::decode_unverified(token, MAX_INSPECT_BYTES)
        .map_err(|r| anyhow::anyhow!("not a JWT: {r}"))?;
    let times: serde_json::Map<String, Value> = ["iat", "nbf", "exp", "auth_time"]
        .iter()
        .filter_map(|k| {
            let secs = claims.get(*k)?.as_i64()?;
            let t = chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0)?;
            Some(((*k).to_owned(), Value::from(t.to_rfc3339())))
        })
        .collect();
    Ok(json!({ "verified": false, "header": header, "claims": claims, "times": times }))
}

pub async fn run(config: &Config, output: Output, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Inspect {
            token,
            validate,
            kind,
            audience,
        } => {
            let token = token_arg(token, "token").await?;
            let mut view = inspect_json(&token)?;
            let mut code = ExitCode::SUCCESS;
            if validate {
                let r = client(config)?
                    .validate_token(ValidateTokenRequest {
                        token,
                        kind: match kind {
                            KindArg::Access => TokenKind::Access,
                            KindArg::Id => TokenKind::Id,
                        } as i32,
                        audience: audience.unwrap_or_default(),
                    })
                    .await
                    .rpc()?;
                view["validation"] = json!({
                    "valid": r.valid,
                    "reason": if r.valid { Value::Null } else { reason_name(r.reason).into() },
                    "kid": r.kid,
                    "expires_at": time(r.expires_at.as_ref()),
                });
                if !r.valid {
                    // Scripts can test `secctl token inspect --validate` like a predicate.
                    code = ExitCode::FAILURE;
                }
            }
            match output {
                Output::Json => emit_json(&view)?,
                Output::Table => emit(&inspect_table(&view))?,
            }
            Ok(code)
        }
        TokenCommand::Revoke(args) => {
            let target = if let Some(j) = args.jti {
                Target::Jti(j)
            } else if let Some(s) = args.subject {
                Target::Subject(s)
            } else if let Some(c) = args.client {
                Target::ClientId(c)
            } else if let Some(f) = args.family {
                Target::FamilyId(f)
            } else if args.token.is_some() {
                Target::Token(token_arg(args.token, "token").await?)
            } else {
                Target::RefreshToken(token_arg(args.refresh_token, "refresh token").await?)
            };
            let r = client(config)?
                .revoke_token(RevokeTokenRequest {
                    target: Some(target),
                    expires_at: args.expires_at.map(sec_common::events::to_timestamp),
                    requesting_client_id: String::new(),
                    reason: args.reason,
                })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&json!({ "revoked": r.revoked }))?,
                Output::Table => emit(&format!("revoked: {}\n", r.revoked))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Stats { window, client: c } => {
            let r = client(config)?
                .token_stats(TokenStatsRequest {
                    window_seconds: u32::try_from(window.unwrap_or(0)).unwrap_or(0),
                    client_id: c.unwrap_or_default(),
                })
                .await
                .rpc()?;
            let total = r.total.clone().unwrap_or_default();
            match output {
                Output::Json => emit_json(&json!({
                    "window_seconds": r.window_seconds,
                    "clients": r.clients.iter().map(stats_json).collect::<Vec<_>>(),
                    "total": stats_json(&total),
                    "active_refresh_families": r.active_refresh_families,
                    "signing_key_rotations": r.signing_key_rotations,
                }))?,
                Output::Table => {
                    let mut rows = r.clients.clone();
                    rows.push(ClientTokenStats {
                        client_id: "TOTAL".into(),
                        ..total
                    });
                    let mut s = stats_table(&rows);
                    s.push_str(&format!(
                        "\nwindow: {}  active refresh families: {}  signing-key rotations: {}\n",
                        crate::output::duration(u64::from(r.window_seconds)),
                        r.active_refresh_families,
                        r.signing_key_rotations
                    ));
                    emit(&s)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn stats_json(s: &ClientTokenStats) -> Value {
    json!({
        "client_id": s.client_id,
        "issued": s.issued,
        "refreshed": s.refreshed,
        "validated": s.validated,
        "rejected": s.rejected.iter()
            .map(|r| (reason_name(r.reason), Value::from(r.count)))
            .collect::<serde_json::Map<_, _>>(),
        "reuse_detected": s.reuse_detected,
        "revoked": s.revoked,
    })
}

fn stats_table(rows: &[ClientTokenStats]) -> String {
    let w = rows
        .iter()
        .map(|r| r.client_id.len())
        .max()
        .unwrap_or(0)
        .max("CLIENT".len());
    let mut s = format!(
        "{:<w$}  {:>8}  {:>9}  {:>9}  {:>8}  {:>5}  {:>7}  REJECTED BY REASON\n",
        "CLIENT", "ISSUED", "REFRESHED", "VALIDATED", "REJECTED", "REUSE", "REVOKED"
    );
    for r in rows {
        let rejected: u64 = r.rejected.iter().map(|x| x.count).sum();
        let reasons = r
            .rejected
            .iter()
            .map(|x| format!("{}={}", reason_name(x.reason), x.count))
            .collect::<Vec<_>>()
            .join(",");
        s.push_str(&format!(
            "{:<w$}  {:>8}  {:>9}  {:>9}  {:>8}  {:>5}  {:>7}  {}\n",
            r.client_id,
            r.issued,
            r.refreshed,
            r.validated,
            rejected,
            r.reuse_detected,
            r.revoked,
            reasons
        ));
    }
    s
}

fn inspect_table(view: &Value) -> String {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let mut s = String::from("NOT VERIFIED: decoded locally; do not trust these values.\n");
    s.push_str(&format!(
        "header:\n{}\nclaims:\n{}\n",
        pretty(&view["header"]),
        pretty(&view["claims"])
    ));
    if let Some(times) = view["times"].as_object() {
        for (k, v) in times {
            s.push_str(&format!("{k:<9} {}\n", v.as_str().unwrap_or_default()));
        }
    }
    if let Some(v) = view.get("validation") {
        if v["valid"] == true {
            s.push_str(&format!(
                "validation: VALID (kid {})\n",
                v["kid"].as_str().unwrap_or_default()
            ));
        } else {
            s.push_str(&format!(
                "validation: INVALID ({})\n",
                v["reason"].as_str().unwrap_or_default()
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("secctl").chain(args.iter().copied()))
    }

    #[test]
    fn revoke_takes_exactly_one_target() {
        assert!(parse(&["token", "revoke"]).is_err());
        assert!(parse(&["token", "revoke", "--jti", "a", "--subject", "b"]).is_err());
        assert!(
            parse(&[
                "token",
                "revoke",
                "--subject",
                "u",
                "--expires-at",
                "2030-01-01T00:00:00Z"
            ])
            .is_err(),
            "--expires-at goes with --jti"
        );
        assert!(parse(&["token", "revoke", "--jti", "a", "--expires-at", "tomorrow"]).is_err());
        let cli = parse(&[
            "token",
            "revoke",
            "--jti",
            "a",
            "--expires-at",
            "2030-01-01T00:00:00Z",
            "--reason",
            "leak",
        ])
        .unwrap();
        match cli.command {
            Command::Token {
                command: TokenCommand::Revoke(a),
            } => {
                assert_eq!(a.jti.as_deref(), Some("a"));
                assert_eq!(a.expires_at.unwrap().timestamp(), 1_893_456_000);
                assert_eq!(a.reason, "leak");
            }
            other => panic!("{other:?}"),
        }
        for flag in [
            "--subject",
            "--client",
            "--family",
            "--token",
            "--refresh-token",
        ] {
            assert!(parse(&["token", "revoke", flag, "x"]).is_ok(), "{flag}");
        }
    }

    #[test]
    fn stats_window_is_bounded() {
        assert!(parse(&["token", "stats", "--window", "1h"]).is_ok());
        assert!(parse(&["token", "stats", "--window", "24h"]).is_ok());
        for bad in ["25h", "0", "soon"] {
            assert!(
                parse(&["token", "stats", "--window", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn inspect_decodes_without_trusting() {
        use sec_common::jwt::{Alg, TokenType, encode};
        let claims = json!({"sub": "u1", "exp": 1_893_456_000, "iat": 1_893_455_000});
        let token = encode(
            Alg::Es256,
            "k1",
            TokenType::Access,
            claims.as_object().unwrap(),
            |_| Ok::<_, ()>(b"sig".to_vec()),
        )
        .unwrap();
        let v = inspect_json(&token).unwrap();
        assert_eq!(v["verified"], false);
        assert_eq!(v["header"]["kid"], "k1");
        assert_eq!(v["claims"]["sub"], "u1");
        assert_eq!(v["times"]["exp"], "2030-01-01T00:00:00+00:00");
        let table = inspect_table(&v);
        assert!(table.starts_with("NOT VERIFIED"), "{table}");
        assert!(inspect_json("not.a-token").is_err());
        assert!(inspect_json("abc").is_err());
    }

    #[test]
    fn reasons_print_as_snake_case() {
        assert_eq!(
            reason_name(InvalidReason::WrongAudience as i32),
            "wrong_audience"
        );
        assert_eq!(
            reason_name(InvalidReason::VerifierStale as i32),
            "verifier_stale"
        );
        assert_eq!(reason_name(99), "unknown(99)");
        // The same names the local verifier uses for its metric labels.
        for r in sec_common::jwt::InvalidReason::ALL {
            let proto = InvalidReason::from_str_name(&format!(
                "INVALID_REASON_{}",
                r.as_str().to_uppercase()
            ));
            assert!(proto.is_some(), "{}", r.as_str());
        }
    }
}

//! `secctl key …` and `secctl kek rotate`: key management on crypto-svc (admin token).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use sec_common::config::Config;
use sec_proto::common::v1::PageRequest;
use sec_proto::crypto::v1::{
    BackupKeyRequest, CreateKeyRequest, DeleteKeyRequest, GetInstallationKeyRequest, GetKeyRequest,
    GetPublicKeyRequest, Key, KeyConfig, ListKeysRequest, RestoreKeyRequest, RotateKekRequest,
    RotateKeyRequest, ServiceList, UpdateKeyConfigRequest,
};

use crate::cli::{KekCommand, KeyCommand};
use crate::output::{Output, key_json, key_table, print_json, print_key, write_raw};
use crate::rpc::{CryptoClient, Rpc as _, crypto, read_text_input};

/// Most keys `key list` fetches (it follows pages up to this).
const LIST_CAP: usize = 100_000;
const PAGE_SIZE: u32 = 500;

pub async fn run(config: &Config, output: Output, cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    let mut c = crypto(config)?;
    match cmd {
        KeyCommand::Create {
            name,
            key_type,
            rotation_period,
            exportable,
            deletion_allowed,
            allowed_services,
        } => {
            let key = c
                .create_key(CreateKeyRequest {
                    name,
                    r#type: key_type.proto() as i32,
                    config: Some(KeyConfig {
                        rotation_period_seconds: rotation_period.unwrap_or(0),
                        exportable,
                        deletion_allowed,
                        allowed_services,
                        ..Default::default()
                    }),
                })
                .await
                .rpc()?;
            print_key(output, &key)?;
        }
        KeyCommand::List => {
            let keys = list_all(&mut c).await?;
            match output {
                Output::Json => print_json(&keys.iter().map(key_json).collect::<Vec<_>>().into())?,
                Output::Table => print!("{}", key_table(&keys)),
            }
        }
        KeyCommand::Get { name } => {
            let key = c.get_key(GetKeyRequest { name }).await.rpc()?;
            print_key(output, &key)?;
        }
        KeyCommand::Rotate { name } => {
            let key = c.rotate_key(RotateKeyRequest { name }).await.rpc()?;
            print_key(output, &key)?;
        }
        KeyCommand::Config {
            name,
            min_decryption_version,
            min_encryption_version,
            rotation_period,
            deletion_allowed,
            exportable,
            allowed_services,
            any_service,
            expected_policy_version,
        } => {
            let allowed_services =
                (any_service || !allowed_services.is_empty()).then_some(ServiceList {
                    services: allowed_services,
                });
            let key = c
                .update_key_config(UpdateKeyConfigRequest {
                    name,
                    min_decryption_version,
                    min_encryption_version,
                    rotation_period_seconds: rotation_period,
                    deletion_allowed,
                    exportable,
                    allowed_services,
                    expected_policy_version,
                })
                .await
                .rpc()?;
            print_key(output, &key)?;
        }
        KeyCommand::Delete { name } => {
            c.delete_key(DeleteKeyRequest { name: name.clone() })
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({ "deleted": name }))?,
                Output::Table => println!("deleted {name}"),
            }
        }
        KeyCommand::Backup {
            name,
            wrapping_key_file,
            out,
        } => {
            let pem = tokio::fs::read_to_string(&wrapping_key_file)
                .await
                .with_context(|| format!("reading {}", wrapping_key_file.display()))?;
            let r = c
                .backup_key(BackupKeyRequest {
                    name,
                    wrapping_public_key_pem: pem,
                })
                .await
                .rpc()?;
            if let Some(path) = &out {
                write_private(path, format!("{}\n", r.backup).as_bytes())?;
            }
            match (output, out) {
                (Output::Json, out) => print_json(&serde_json::json!({
                    "backup": if out.is_some() { None } else { Some(&r.backup) },
                    "out": out.map(|p| p.display().to_string()),
                    "source_public_key_pem": r.source_public_key_pem,
                }))?,
                (Output::Table, Some(path)) => {
                    eprintln!(
                        "backup written to {}; the target pins this installation's key (secctl key installation-key)",
                        path.display()
                    );
                }
                (Output::Table, None) => println!("{}", r.backup),
            }
        }
        KeyCommand::InstallationKey => {
            let r = c
                .get_installation_key(GetInstallationKeyRequest {})
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "public_key_pem": r.public_key_pem,
                    "fingerprint": r.fingerprint,
                }))?,
                Output::Table => print!("{}", r.public_key_pem),
            }
        }
        KeyCommand::Restore {
            wrapping_key,
            source_key_file,
            new_name,
            input,
        } => {
            let source_public_key_pem = tokio::fs::read_to_string(&source_key_file)
                .await
                .with_context(|| format!("reading {}", source_key_file.display()))?;
            let backup = read_text_input(input.as_deref(), "backup").await?;
            let key = c
                .restore_key(RestoreKeyRequest {
                    backup,
                    wrapping_key_name: wrapping_key,
                    new_name: new_name.unwrap_or_default(),
                    source_public_key_pem,
                })
                .await
                .rpc()?;
            print_key(output, &key)?;
        }
        KeyCommand::Public { name, version } => {
            let r = c
                .get_public_key(GetPublicKeyRequest {
                    key_name: name,
                    version: version.unwrap_or(0),
                })
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "version": r.version,
                    "public_key_pem": r.public_key_pem,
                }))?,
                Output::Table => {
                    let mut pem = r.public_key_pem;
                    if !pem.ends_with('\n') {
                        pem.push('\n');
                    }
                    write_raw(pem.as_bytes())?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every key, following page tokens (bounded by [`LIST_CAP`]).
async fn list_all(c: &mut CryptoClient) -> anyhow::Result<Vec<Key>> {
    let mut keys = Vec::new();
    let mut token = String::new();
    loop {
        let resp = c
            .list_keys(ListKeysRequest {
                page: Some(PageRequest {
                    page_size: PAGE_SIZE,
                    page_token: token,
                }),
            })
            .await
            .rpc()?;
        let got = resp.keys.len();
        keys.extend(resp.keys);
        token = resp.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() || got == 0 || keys.len() >= LIST_CAP {
            return Ok(keys);
        }
    }
}

pub async fn kek(config: &Config, output: Output, cmd: KekCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KekCommand::Rotate => {
            let r = crypto(config)?
                .rotate_kek(RotateKekRequest {})
                .await
                .rpc()?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "rewrapped": r.rewrapped,
                    "already_current": r.already_current,
                    "current_kek_id": r.current_kek_id,
                }))?,
                Output::Table => {
                    println!("rewrapped:       {}", r.rewrapped);
                    println!("already_current: {}", r.already_current);
                    println!("current_kek_id:  {}", r.current_kek_id);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `data` to `path`, readable by its owner alone (0600, also when it existed).
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn backup_file_is_private_even_if_it_existed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, "old, longer content").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"sec-backup:v1:x\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "sec-backup:v1:x\n");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

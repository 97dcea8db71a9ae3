//! How results are shown: tables and detail views for people, JSON (snake_case fields)
//! for scripts.

use std::io::Write as _;

use clap::ValueEnum;
use sec_proto::crypto::v1::Key;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Prints `v` pretty-printed, with a trailing newline.
pub fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Writes `bytes` to stdout exactly (no newline added) and flushes; a reader that went
/// away (`| head`) ends the command quietly.
pub fn write_raw(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

/// RFC 3339 in UTC with microseconds, or empty when unset.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(sec_common::events::from_timestamp)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// Seconds as the largest whole unit: `30d`, `12h`, `90m`, `45s`; `off` for 0.
pub fn duration(secs: u64) -> String {
    match secs {
        0 => "off".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A key as JSON. Keys carry no secret material, only public keys of asymmetric types.
pub fn key_json(k: &Key) -> serde_json::Value {
    let c = k.config.clone().unwrap_or_default();
    let versions: Vec<_> = k
        .versions
        .iter()
        .map(|v| {
            let mut o = serde_json::json!({
                "version": v.version,
                "created_at": time(v.created_at.as_ref()),
                "encryptions": v.encryptions,
            });
            if !v.public_key_pem.is_empty() {
                o["public_key_pem"] = v.public_key_pem.clone().into();
            }
            o
        })
        .collect();
    serde_json::json!({
        "name": k.name,
        "type": k.type_name,
        "latest_version": k.latest_version,
        "min_decryption_version": c.min_decryption_version,
        "min_encryption_version": c.min_encryption_version,
        "rotation_period_seconds": c.rotation_period_seconds,
        "deletion_allowed": c.deletion_allowed,
        "exportable": c.exportable,
        "allowed_services": c.allowed_services,
        "policy_version": k.policy_version,
        "integrity_failed": k.integrity_failed,
        "operations": k.operations,
        "created_at": time(k.created_at.as_ref()),
        "updated_at": time(k.updated_at.as_ref()),
        "last_rotated_at": time(k.last_rotated_at.as_ref()),
        "versions": versions,
    })
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The `key list` table.
pub fn key_table(keys: &[Key]) -> String {
    let mut s = format!(
        "{:<32} {:<18} {:>6} {:>7} {:>8} {:<10} {:<9}\n",
        "NAME", "TYPE", "LATEST", "MIN_DEC", "ROTATION", "EXPORTABLE", "DELETABLE"
    );
    for k in keys {
        let c = k.config.clone().unwrap_or_default();
        s.push_str(&format!(
            "{:<32} {:<18} {:>6} {:>7} {:>8} {:<10} {:<9}\n",
            k.name,
            k.type_name,
            k.latest_version,
            c.min_decryption_version,
            duration(c.rotation_period_seconds),
            yes_no(c.exportable),
            yes_no(c.deletion_allowed),
        ));
    }
    s
}

/// One key, for people: its settings, then each version (with its public key, if any).
pub fn key_detail(k: &Key) -> String {
    let c = k.config.clone().unwrap_or_default();
    let min_enc = match c.min_encryption_version {
        0 => "latest".to_owned(),
        v => v.to_string(),
    };
    let mut s = String::new();
    for (label, value) in [
        ("name", k.name.clone()),
        ("type", k.type_name.clone()),
        ("latest version", k.latest_version.to_string()),
        ("min decryption", c.min_decryption_version.to_string()),
        ("min encryption", min_enc),
        ("rotation", duration(c.rotation_period_seconds)),
        ("exportable", yes_no(c.exportable).into()),
        ("deletion allowed", yes_no(c.deletion_allowed).into()),
        (
            "services",
            if c.allowed_services.is_empty() {
                "any trusted".to_owned()
            } else {
                c.allowed_services.join(", ")
            },
        ),
        ("operations", k.operations.join(", ")),
        (
            "integrity",
            if k.integrity_failed {
                "FAILED (record tampered: every operation is refused)".to_owned()
            } else {
                "ok".to_owned()
            },
        ),
        ("created", time(k.created_at.as_ref())),
        ("last rotated", time(k.last_rotated_at.as_ref())),
    ] {
        s.push_str(&format!("{:<17} {value}\n", format!("{label}:")));
    }
    s.push_str("versions:\n");
    for v in &k.versions {
        s.push_str(&format!(
            "  v{:<4} {}\n",
            v.version,
            time(v.created_at.as_ref())
        ));
        for line in v.public_key_pem.lines() {
            s.push_str(&format!("        {line}\n"));
        }
    }
    s
}

/// Prints one key in the chosen format.
pub fn print_key(output: Output, k: &Key) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&key_json(k)),
        Output::Table => {
            print!("{}", key_detail(k));
            Ok(())
        }
    }
}

pub use sec_common::events::json::event_json;

#[cfg(test)]
mod tests {
    use super::*;
    use sec_proto::crypto::v1::{KeyConfig, KeyVersion};

    fn key(pem: &str) -> Key {
        Key {
            name: "k".into(),
            type_name: "ed25519".into(),
            latest_version: 2,
            config: Some(KeyConfig {
                rotation_period_seconds: 30 * 86_400,
                exportable: true,
                ..Default::default()
            }),
            versions: vec![KeyVersion {
                version: 1,
                created_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                public_key_pem: pem.into(),
                encryptions: 0,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn key_json_is_snake_case_and_pem_only_when_present() {
        let j = key_json(&key(
            "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n",
        ));
        assert_eq!(j["type"], "ed25519");
        assert_eq!(j["latest_version"], 2);
        assert_eq!(j["rotation_period_seconds"], 2_592_000);
        assert_eq!(j["exportable"], true);
        assert_eq!(j["deletion_allowed"], false);
        assert_eq!(
            j["versions"][0]["created_at"],
            "2023-11-14T22:13:20.000000Z"
        );
        assert!(
            j["versions"][0]["public_key_pem"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        let j = key_json(&key(""));
        assert!(j["versions"][0].get("public_key_pem").is_none());
    }

    #[test]
    fn table_and_durations() {
        assert_eq!(duration(0), "off");
        assert_eq!(duration(86_400 * 30), "30d");
        assert_eq!(duration(43_200), "12h");
        assert_eq!(duration(5400), "90m");
        assert_eq!(duration(3601), "3601s");
        let t = key_table(&[key("")]);
        let mut lines = t.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            [
                "NAME",
                "TYPE",
                "LATEST",
                "MIN_DEC",
                "ROTATION",
                "EXPORTABLE",
                "DELETABLE"
            ]
        );
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["k", "ed25519", "2", "0", "30d", "yes", "no"]
        );
    }
}

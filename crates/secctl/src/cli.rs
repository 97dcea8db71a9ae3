//! The command line: every subcommand and flag, and the value parsers clap runs (so a
//! bad duration or key type is a usage error, exit 2, before anything is dialled).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sec_proto::crypto::v1::KeyType;

use crate::output::Output;

#[derive(Debug, Parser)]
#[command(name = "secctl", version, about = "Operate the security platform")]
pub struct Cli {
    /// TOML configuration file (the one the services use); `SEC_*` variables overlay it.
    #[arg(long, short, env = "SEC_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// gRPC health of every service (exit 1 if any is not SERVING).
    Status,
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Named keys in crypto-svc: create, inspect, rotate, configure, back up.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The key-encryption key that wraps every stored key version.
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Encrypt stdin (or --in FILE) under a key; prints the `sec:v…` ciphertext.
    Encrypt(CryptArgs),
    /// Decrypt a `sec:v…` ciphertext from stdin (or --in FILE); writes the raw plaintext.
    Decrypt(CryptArgs),
    /// JWTs of token-svc: inspect, revoke, stats.
    Token {
        #[command(subcommand)]
        command: crate::token::TokenCommand,
    },
    /// token-svc's JWT signing keys: list, rotate, revoke.
    SigningKey {
        #[command(subcommand)]
        command: crate::signing_keys::SigningKeyCommand,
    },
    /// Sessions in session-svc: list, revoke, log out everywhere, stats, backup/restore.
    Session {
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// OAuth clients of auth-svc: create, list, get, update, delete, rotate-secret.
    Client {
        #[command(subcommand)]
        command: crate::auth_admin::ClientCommand,
    },
    /// Users of auth-svc: create, list, get, disable, set-password.
    User {
        #[command(subcommand)]
        command: crate::auth_admin::UserCommand,
    },
    /// Edge rate limits (auth-svc): rules, set, delete, stats.
    Ratelimit {
        #[command(subcommand)]
        command: crate::edge::RateLimitCommand,
    },
    /// Edge IP lists and automatic blocks (auth-svc): allow, deny, list, unblock, stats.
    Ip {
        #[command(subcommand)]
        command: crate::edge::IpCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// A user's live sessions (handles, never ids).
    List {
        #[arg(long)]
        user: String,
    },
    /// Revoke one session by its handle.
    Revoke { handle: String },
    /// Revoke every session of a user ("log out everywhere").
    RevokeUser { user: String },
    /// Live sessions in total and per client, and this replica's counters.
    Stats,
    /// Write every live session to FILE, encrypted through crypto-svc.
    Backup {
        file: PathBuf,
        /// crypto-svc key (AES-256-GCM) to seal under; created if missing.
        #[arg(long, default_value = crate::session::DEFAULT_KEY)]
        key: String,
    },
    /// Load a backup; sessions expired since are skipped.
    Restore {
        file: PathBuf,
        #[arg(long, default_value = crate::session::DEFAULT_KEY)]
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recent events, newest first.
    List {
        /// Exact event type, or a prefix ending in `*` (e.g. `sec.crypto.*`).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// How many events.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Recompute the tamper-evident hash chain and check its signed checkpoints; exits 3
    /// and names the first bad position when the trail was altered.
    Verify {
        /// First position to check (default: the start). Checking starts from the newest
        /// signed checkpoint before it, so `--from <last checked + 1>` checks only what is new.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last position to check (default: the head).
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
    /// The chain's head and its newest signed checkpoint.
    Head,
    /// Stream matching events to stdout as JSON Lines (default) or CSV.
    Export {
        /// Exact event type, or a prefix ending in `*`; repeatable (any of them).
        #[arg(long = "type")]
        event_types: Vec<String>,
        /// Only events at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only events before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// An address or a CIDR block.
        #[arg(long)]
        ip: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportFormatArg::Jsonl)]
        format: ExportFormatArg,
        /// Oldest first (default: newest first).
        #[arg(long)]
        oldest_first: bool,
        /// Most events (at most 1,000,000).
        #[arg(long, default_value_t = 100_000)]
        limit: u32,
    },
    /// Alerts raised by audit-svc's rules, newest first.
    Alerts {
        #[arg(long, value_enum, default_value_t = AlertStatusArg::Open)]
        status: AlertStatusArg,
        /// Only this rule's alerts.
        #[arg(long)]
        rule: Option<String>,
        /// How many alerts (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Acknowledge an open alert (fails with Aborted when it is not open any more).
    Ack {
        /// The alert's id.
        id: String,
        /// Why, for the record.
        #[arg(long)]
        note: Option<String>,
    },
    /// Open alerts, ingest lag, dead letters and the chain head at a glance.
    Monitor,
    /// A compliance report to stdout: `access` (who accessed what, per subject),
    /// `changes` (configuration and key changes) or `incidents` (alerts with their
    /// events), as one JSON document (default, and with `-o json`) or CSV.
    Report {
        #[arg(value_enum)]
        kind: ReportKindArg,
        /// Only events at or after this RFC 3339 time (default: 30 days before --until).
        #[arg(long)]
        since: Option<String>,
        /// Only events before this RFC 3339 time (default: now).
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long, value_enum, default_value_t = ReportFormatArg::Json)]
        format: ReportFormatArg,
    },
    /// Run retention now: remove (export first, when configured) the events past their
    /// retention rule and under no legal hold.
    Retention {
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Legal holds: events a hold matches are never removed by retention.
    Hold {
        #[command(subcommand)]
        command: HoldCommand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportKindArg {
    Access,
    Changes,
    Incidents,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormatArg {
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Place a hold (at least one of the filters is advised; none holds everything).
    Create {
        /// Unique among active holds: A-Z a-z 0-9 . _ -
        name: String,
        /// Why (case reference).
        #[arg(long)]
        reason: String,
        /// Event type prefix, e.g. `sec.auth.`.
        #[arg(long = "type-prefix")]
        type_prefix: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// Events at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Events before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
    },
    /// Release a hold by id.
    Release { id: String },
    /// Active holds (with --all, released ones too).
    List {
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AlertStatusArg {
    Open,
    Acknowledged,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormatArg {
    Jsonl,
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key (version 1).
    Create {
        name: String,
        #[arg(long = "type", value_enum)]
        key_type: KeyTypeArg,
        /// Rotate automatically this often (e.g. 30d, 12h, 3600s; at least 1h). 0: never.
        #[arg(long, value_parser = parse_duration)]
        rotation_period: Option<u64>,
        /// Allow `key backup`.
        #[arg(long)]
        exportable: bool,
        /// Allow `key delete`.
        #[arg(long)]
        deletion_allowed: bool,
        /// Only this service identity (mTLS identity, or `internal`) may use the key;
        /// repeat for several. Default: any trusted service.
        #[arg(long = "allowed-service", value_name = "ID")]
        allowed_services: Vec<String>,
    },
    /// Every key (follows pages).
    List,
    /// One key with its versions and public keys.
    Get { name: String },
    /// Add a new version; it becomes the one new ciphertexts use.
    Rotate { name: String },
    /// Change a key's policy; only the flags given are changed.
    Config {
        name: String,
        /// Refuse ciphertexts and signatures of older versions.
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// Encrypt with at least this version (0: the latest).
        #[arg(long)]
        min_encryption_version: Option<u32>,
        /// Automatic rotation period (e.g. 30d, 12h, 3600s); 0 turns it off.
        #[arg(long, value_parser = parse_duration)]
        rotation_period: Option<u64>,
        #[arg(long, value_name = "true|false")]
        deletion_allowed: Option<bool>,
        #[arg(long, value_name = "true|false")]
        exportable: Option<bool>,
        /// Replace the services that may use the key with these (repeatable).
        #[arg(long = "allowed-service", value_name = "ID")]
        allowed_services: Vec<String>,
        /// Lift the service limit: any trusted service may use the key.
        #[arg(long, conflicts_with = "allowed_services")]
        any_service: bool,
        /// Apply only if the key's policy version (`key get -o json`) is still this.
        #[arg(long, value_name = "N")]
        expected_policy_version: Option<u64>,
    },
    /// Delete a key and all its versions (refused unless the key allows deletion).
    Delete { name: String },
    /// Print this installation's backup-signing public key (PEM; `-o json` adds its
    /// SHA-256 fingerprint). Targets pin it with `key restore --source-key-file`.
    InstallationKey,
    /// Export a key, encrypted to an RSA public key of the installation that will restore
    /// it and signed by this installation (see `key installation-key`).
    Backup {
        name: String,
        /// PEM public key (SubjectPublicKeyInfo) of an RSA-3072/4096 key, e.g. from `key public`.
        #[arg(long, value_name = "PEM_FILE")]
        wrapping_key_file: PathBuf,
        /// Write the backup here (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Import a backup made for one of this installation's rsa-*-wrapping keys.
    Restore {
        /// Name of the local rsa-*-wrapping key whose public key the backup was made for.
        #[arg(long, value_name = "NAME")]
        wrapping_key: String,
        /// The source installation's backup-signing public key (its `key
        /// installation-key`), obtained over a channel you trust: the backup's signature
        /// must verify against it, or nothing is restored.
        #[arg(long, value_name = "PEM_FILE")]
        source_key_file: PathBuf,
        /// Restore under this name instead of the original.
        #[arg(long, value_name = "NAME")]
        new_name: Option<String>,
        /// Read the backup from FILE instead of stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Print the PEM public key of an asymmetric key.
    Public {
        name: String,
        /// Version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KekCommand {
    /// Re-wrap every key version still wrapped by a previous KEK under the current one.
    Rotate,
}

#[derive(Debug, Args)]
pub struct CryptArgs {
    /// Key name.
    pub key: String,
    /// Associated data: authenticated, not encrypted; decrypt needs the same text.
    #[arg(long)]
    pub aad: Option<String>,
    /// Read from FILE instead of stdin.
    #[arg(long = "in", value_name = "FILE")]
    pub input: Option<PathBuf>,
}

/// Key types by their canonical names (the `type_name` crypto-svc reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyTypeArg {
    #[value(name = "aes256-gcm")]
    Aes256Gcm,
    #[value(name = "chacha20-poly1305")]
    Chacha20Poly1305,
    #[value(name = "aes256-gcm-siv")]
    Aes256GcmSiv,
    #[value(name = "rsa-3072")]
    Rsa3072,
    #[value(name = "rsa-4096")]
    Rsa4096,
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    #[value(name = "ecdsa-p384")]
    EcdsaP384,
    #[value(name = "ed25519")]
    Ed25519,
    #[value(name = "hmac-sha256")]
    HmacSha256,
    /// Receives backups only (`key restore --wrapping-key`); no other operation.
    #[value(name = "rsa-3072-wrapping")]
    Rsa3072Wrapping,
    #[value(name = "rsa-4096-wrapping")]
    Rsa4096Wrapping,
}

impl KeyTypeArg {
    pub fn proto(self) -> KeyType {
        match self {
            Self::Aes256Gcm => KeyType::Aes256Gcm,
            Self::Chacha20Poly1305 => KeyType::Chacha20Poly1305,
            Self::Aes256GcmSiv => KeyType::Aes256GcmSiv,
            Self::Rsa3072 => KeyType::Rsa3072,
            Self::Rsa4096 => KeyType::Rsa4096,
            Self::EcdsaP256 => KeyType::EcdsaP256,
            Self::EcdsaP384 => KeyType::EcdsaP384,
            Self::Ed25519 => KeyType::Ed25519,
            Self::HmacSha256 => KeyType::HmacSha256,
            Self::Rsa3072Wrapping => KeyType::Rsa3072Wrapping,
            Self::Rsa4096Wrapping => KeyType::Rsa4096Wrapping,
        }
    }
}

/// `30d`, `12h`, `90m`, `3600s` (or `0`) → seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(0);
    }
    let help = || {
        format!("`{s}`: expected a number with a unit s, m, h or d (e.g. 30d, 12h, 3600s), or 0")
    };
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(help)?;
    let (digits, unit) = s.split_at(unit_at);
    let n: u64 = digits.parse().map_err(|_| help())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(help()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}`: duration too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("3600s"), Ok(3600));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("0"), Ok(0));
        for bad in [
            "",
            "d",
            "30",
            "3.5h",
            "-1h",
            "1y",
            "12 h",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("300000000000000000d").is_err(), "overflow");
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn key_type_names_are_the_canonical_ones() {
        for (arg, name) in [
            (KeyTypeArg::Aes256Gcm, "aes256-gcm"),
            (KeyTypeArg::Chacha20Poly1305, "chacha20-poly1305"),
            (KeyTypeArg::Aes256GcmSiv, "aes256-gcm-siv"),
            (KeyTypeArg::Rsa3072, "rsa-3072"),
            (KeyTypeArg::Rsa4096, "rsa-4096"),
            (KeyTypeArg::EcdsaP256, "ecdsa-p256"),
            (KeyTypeArg::EcdsaP384, "ecdsa-p384"),
            (KeyTypeArg::Ed25519, "ed25519"),
            (KeyTypeArg::HmacSha256, "hmac-sha256"),
            (KeyTypeArg::Rsa3072Wrapping, "rsa-3072-wrapping"),
            (KeyTypeArg::Rsa4096Wrapping, "rsa-4096-wrapping"),
        ] {
            assert_eq!(KeyTypeArg::from_str(name, false), Ok(arg));
            let proto = arg.proto().as_str_name().trim_start_matches("KEY_TYPE_");
            assert_eq!(proto.replace('_', "").to_lowercase(), name.replace('-', ""));
        }
    }

    #[test]
    fn config_flags_are_optional_and_typed() {
        let cli = Cli::try_parse_from([
            "secctl",
            "key",
            "config",
            "k",
            "--deletion-allowed",
            "true",
            "--rotation-period",
            "0",
        ])
        .unwrap();
        match cli.command {
            Command::Key {
                command:
                    KeyCommand::Config {
                        deletion_allowed,
                        exportable,
                        rotation_period,
                        min_decryption_version,
                        ..
                    },
            } => {
                assert_eq!(deletion_allowed, Some(true));
                assert_eq!(exportable, None);
                assert_eq!(rotation_period, Some(0));
                assert_eq!(min_decryption_version, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["secctl", "key", "create", "k", "--type", "rsa3072"]).is_err()
        );
        assert!(
            Cli::try_parse_from([
                "secctl",
                "key",
                "create",
                "k",
                "--type",
                "ed25519",
                "--rotation-period",
                "soon"
            ])
            .is_err()
        );
    }
}

//! `secctl signing-key list|rotate|revoke`: token-svc's JWT signing keys (admin).

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use sec_common::config::Config;
use sec_proto::token::v1::{
    Algorithm, KeyState, ListSigningKeysRequest, RevokeSigningKeyRequest, RotateSigningKeyRequest,
    SigningKey,
};
use serde_json::{Value, json};

use crate::output::{Output, time};
use crate::rpc::Rpc as _;
use crate::token::{client, emit, emit_json};

#[derive(Debug, Subcommand)]
pub enum SigningKeyCommand {
    /// Published keys (next, current, retiring); `--all` adds retired and revoked ones.
    List {
        #[arg(long)]
        all: bool,
    },
    /// Promote `next` to `current` now (the old current starts retiring) and create a new
    /// `next`.
    Rotate {
        /// Algorithm of the new `next` key (default: the configured one).
        #[arg(long, value_enum)]
        alg: Option<AlgArg>,
    },
    /// A compromised key: unpublished at once, every token it signed invalid.
    Revoke {
        kid: String,
        /// Why (recorded in the event).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlgArg {
    #[value(name = "ES256", alias = "es256")]
    Es256,
    #[value(name = "EdDSA", alias = "eddsa")]
    EdDsa,
    #[value(name = "RS256", alias = "rs256")]
    Rs256,
    #[value(name = "PS256", alias = "ps256")]
    Ps256,
}

impl AlgArg {
    fn proto(self) -> Algorithm {
        match self {
            Self::Es256 => Algorithm::Es256,
            Self::EdDsa => Algorithm::Eddsa,
            Self::Rs256 => Algorithm::Rs256,
            Self::Ps256 => Algorithm::Ps256,
        }
    }
}

/// `ALGORITHM_EDDSA` → `EdDSA` (the JOSE name).
fn alg_name(a: i32) -> &'static str {
    match Algorithm::try_from(a) {
        Ok(Algorithm::Es256) => "ES256",
        Ok(Algorithm::Eddsa) => "EdDSA",
        Ok(Algorithm::Rs256) => "RS256",
        Ok(Algorithm::Ps256) => "PS256",
        _ => "unknown",
    }
}

fn state_name(s: i32) -> &'static str {
    match KeyState::try_from(s) {
        Ok(KeyState::Next) => "next",
        Ok(KeyState::Current) => "current",
        Ok(KeyState::Retiring) => "retiring",
        Ok(KeyState::Retired) => "retired",
        Ok(KeyState::Revoked) => "revoked",
        _ => "unknown",
    }
}

pub fn key_json(k: &SigningKey) -> Value {
    json!({
        "kid": k.kid,
        "alg": alg_name(k.alg),
        "state": state_name(k.state),
        "created_at": time(k.created_at.as_ref()),
        "activated_at": time(k.activated_at.as_ref()),
        "deactivated_at": time(k.deactivated_at.as_ref()),
        "unpublish_at": time(k.unpublish_at.as_ref()),
        "revoked_at": time(k.revoked_at.as_ref()),
        // A public key only; null when token-svc withholds it.
        "public_jwk": serde_json::from_str::<Value>(&k.public_jwk_json).unwrap_or(Value::Null),
    })
}

pub fn key_table(keys: &[&SigningKey]) -> String {
    let w = keys
        .iter()
        .map(|k| k.kid.len())
        .max()
        .unwrap_or(0)
        .max("KID".len());
    let mut s = format!(
        "{:<w$}  {:<5}  {:<8}  {:<20}  {:<20}  {:<20}\n",
        "KID", "ALG", "STATE", "ACTIVATED", "DEACTIVATED", "UNPUBLISH/REVOKED"
    );
    let short = |t: Option<&prost_types::Timestamp>| {
        t.and_then(sec_common::events::from_timestamp)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| "-".into())
    };
    for k in keys {
        let end = if k.revoked_at.is_some() {
            short(k.revoked_at.as_ref())
        } else {
            short(k.unpublish_at.as_ref())
        };
        s.push_str(&format!(
            "{:<w$}  {:<5}  {:<8}  {:<20}  {:<20}  {:<20}\n",
            k.kid,
            alg_name(k.alg),
            state_name(k.state),
            short(k.activated_at.as_ref()),
            short(k.deactivated_at.as_ref()),
            end
        ));
    }
    s
}

pub async fn run(
    config: &Config,
    output: Output,
    cmd: SigningKeyCommand,
) -> anyhow::Result<ExitCode> {
    let mut c = client(config)?;
    match cmd {
        SigningKeyCommand::List { all } => {
            let r = c
                .list_signing_keys(ListSigningKeysRequest {
                    include_inactive: all,
                })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&r.keys.iter().map(key_json).collect::<Vec<_>>().into())?,
                Output::Table => emit(&key_table(&r.keys.iter().collect::<Vec<_>>()))?,
            }
        }
        SigningKeyCommand::Rotate { alg } => {
            let r = c
                .rotate_signing_key(RotateSigningKeyRequest {
                    alg: alg.map_or(Algorithm::Unspecified, AlgArg::proto) as i32,
                })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&json!({
                    "current": r.current.as_ref().map(key_json),
                    "next": r.next.as_ref().map(key_json),
                    "retiring": r.retiring.as_ref().map(key_json),
                }))?,
                Output::Table => {
                    let keys: Vec<&SigningKey> = [&r.current, &r.next, &r.retiring]
                        .into_iter()
                        .flatten()
                        .collect();
                    emit(&key_table(&keys))?;
                }
            }
        }
        SigningKeyCommand::Revoke { kid, reason } => {
            let k = c
                .revoke_signing_key(RevokeSigningKeyRequest { kid, reason })
                .await
                .rpc()?;
            match output {
                Output::Json => emit_json(&key_json(&k))?,
                Output::Table => emit(&key_table(&[&k]))?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser as _;

    #[test]
    fn algorithms_take_their_jose_names() {
        for (name, alg) in [
            ("ES256", AlgArg::Es256),
            ("EdDSA", AlgArg::EdDsa),
            ("rs256", AlgArg::Rs256),
            ("PS256", AlgArg::Ps256),
        ] {
            assert_eq!(AlgArg::from_str(name, false), Ok(alg));
        }
        for bad in ["none", "HS256", "ES384"] {
            assert!(
                Cli::try_parse_from(["secctl", "signing-key", "rotate", "--alg", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(
            Cli::try_parse_from(["secctl", "signing-key", "revoke"]).is_err(),
            "kid required"
        );
    }

    #[test]
    fn keys_print_with_names_not_numbers() {
        let k = SigningKey {
            kid: "k1".into(),
            alg: Algorithm::Eddsa as i32,
            state: KeyState::Retiring as i32,
            public_jwk_json: r#"{"kty":"OKP","crv":"Ed25519","x":"AA","kid":"k1"}"#.into(),
            ..Default::default()
        };
        let j = key_json(&k);
        assert_eq!(
            (j["alg"].as_str(), j["state"].as_str()),
            (Some("EdDSA"), Some("retiring"))
        );
        assert_eq!(j["public_jwk"]["kty"], "OKP");
        let t = key_table(&[&k]);
        assert!(
            t.contains("k1") && t.contains("EdDSA") && t.contains("retiring"),
            "{t}"
        );
    }
}

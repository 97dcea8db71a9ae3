//! `secctl encrypt` / `secctl decrypt`: data through a crypto-svc key.

use std::process::ExitCode;

use sec_common::config::Config;
use sec_proto::crypto::v1::{DecryptRequest, EncryptRequest};

use crate::cli::CryptArgs;
use crate::output::{Output, print_json, write_raw};
use crate::rpc::{Rpc as _, crypto, read_input, read_text_input};

/// Encrypts all of the input (bytes as they are) and prints the ciphertext.
pub async fn encrypt(config: &Config, output: Output, args: CryptArgs) -> anyhow::Result<ExitCode> {
    let plaintext = read_input(args.input.as_deref()).await?;
    let r = crypto(config)?
        .encrypt(EncryptRequest {
            key_name: args.key,
            plaintext,
            associated_data: args.aad.map(String::into_bytes).unwrap_or_default(),
        })
        .await
        .rpc()?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "ciphertext": r.ciphertext,
            "key_version": r.key_version,
        }))?,
        Output::Table => println!("{}", r.ciphertext),
    }
    Ok(ExitCode::SUCCESS)
}

/// Decrypts the input (surrounding whitespace ignored) and writes the plaintext bytes
/// exactly, whatever `--output` says: it may be binary.
pub async fn decrypt(config: &Config, args: CryptArgs) -> anyhow::Result<ExitCode> {
    let ciphertext = read_text_input(args.input.as_deref(), "ciphertext").await?;
    let r = crypto(config)?
        .decrypt(DecryptRequest {
            key_name: args.key,
            ciphertext,
            associated_data: args.aad.map(String::into_bytes).unwrap_or_default(),
        })
        .await
        .rpc()?;
    write_raw(&r.plaintext)?;
    Ok(ExitCode::SUCCESS)
}

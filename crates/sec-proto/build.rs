//! Generates the tonic/prost code from `proto/` with a vendored `protoc`, so a newcomer
//! needs no system install.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "sec/common/v1/common.proto",
        "sec/auth/v1/auth.proto",
        "sec/token/v1/token.proto",
        "sec/session/v1/session.proto",
        "sec/audit/v1/audit.proto",
        "sec/crypto/v1/crypto.proto",
        "sec/gdpr/v1/gdpr.proto",
        "sec/assess/v1/assess.proto",
        "sec/edge/v1/edge.proto",
    ];
    let protos: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [root.clone(), protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("sec_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}

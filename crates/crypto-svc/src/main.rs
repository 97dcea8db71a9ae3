fn main() -> std::process::ExitCode {
    sec_common::service::standalone_main(&crypto_svc::SPEC)
}

fn main() -> std::process::ExitCode {
    sec_common::service::standalone_main(&token_svc::SPEC)
}

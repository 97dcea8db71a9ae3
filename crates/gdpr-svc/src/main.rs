fn main() -> std::process::ExitCode {
    sec_common::service::standalone_main(&gdpr_svc::SPEC)
}

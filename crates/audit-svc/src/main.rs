fn main() -> std::process::ExitCode {
    sec_common::service::standalone_main(&audit_svc::SPEC)
}

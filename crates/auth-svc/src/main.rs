fn main() -> std::process::ExitCode {
    sec_common::service::standalone_main(&auth_svc::SPEC)
}

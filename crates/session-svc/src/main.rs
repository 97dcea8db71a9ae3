fn main() -> std::process::ExitCode {
    sec_common::service::standalone_main(&session_svc::SPEC)
}

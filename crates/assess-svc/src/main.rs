fn main() -> std::process::ExitCode {
    sec_common::service::standalone_main(&assess_svc::SPEC)
}

//! The standalone binary checks its configuration before binding, as `secd` does.

use sec_testkit::assert_config_error;

const BIN: &str = env!("CARGO_BIN_EXE_auth-svc");

#[test]
fn standalone_auth_svc_needs_the_address_of_crypto_svc() {
    // The facade calls crypto-svc: alone, auth-svc must be told where it is.
    assert_config_error(BIN, &[], "auth", &[], "services.crypto.endpoint");
    assert_config_error(
        BIN,
        &["check-config"],
        "auth",
        &[("SEC_SERVICES__CRYPTTO__ENDPOINT", "http://127.0.0.1:1")],
        "services.cryptto",
    );
}

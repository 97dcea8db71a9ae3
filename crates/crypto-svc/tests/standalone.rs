//! The standalone binary checks its configuration before binding, as `secd` does.

use sec_testkit::assert_config_error;

const BIN: &str = env!("CARGO_BIN_EXE_crypto-svc");

#[test]
fn standalone_crypto_svc_refuses_bad_config_with_exit_64() {
    for (env, key) in [
        (&[("SEC_CRYPTO__KEK", "dG9vIHNob3J0")][..], "crypto.kek"),
        (
            &[("SEC_CRYPTO__KEK_FILE", "/nonexistent/kek")][..],
            "crypto.kek",
        ),
        (
            &[
                ("SEC_TLS__CERT_FILE", "/nonexistent/c.pem"),
                ("SEC_TLS__KEY_FILE", "/nonexistent/k.pem"),
            ][..],
            "tls",
        ),
        (
            &[("SEC_AUTH__ADMIN_TOKEN_HASH", "plain")][..],
            "auth.admin_token_hash",
        ),
        // A section of another service is a typo here, not a setting.
        (&[("SEC_TOKEN__ISSUER", "x")][..], "token"),
    ] {
        assert_config_error(BIN, &[], "crypto", env, key);
    }
}

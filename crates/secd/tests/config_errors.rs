//! Every fallible piece of configuration is checked before any port is bound: `secd`
//! exits 64 and names the key (the gRPC port the test holds proves nothing was bound).

use sec_testkit::assert_config_error;

const SECD: &str = env!("CARGO_BIN_EXE_secd");
const KEK_32: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn dev(env: &[(&str, &str)], key: &str) {
    assert_config_error(SECD, &["dev"], "crypto", env, key);
}

#[test]
fn missing_tls_files() {
    dev(
        &[
            ("SEC_TLS__CERT_FILE", "/nonexistent/cert.pem"),
            ("SEC_TLS__KEY_FILE", "/nonexistent/key.pem"),
        ],
        "tls",
    );
}

#[test]
fn malformed_kek_is_named_and_not_echoed() {
    dev(&[("SEC_CRYPTO__KEK", "dG9vIHNob3J0")], "crypto.kek");
}

#[test]
fn missing_kek_file() {
    dev(
        &[("SEC_CRYPTO__KEK_FILE", "/nonexistent/kek")],
        "crypto.kek",
    );
}

#[test]
fn real_database_without_a_kek() {
    dev(
        &[(
            "SEC_STORAGE__DATABASE_URL",
            "postgres://sec@127.0.0.1:1/sec",
        )],
        "crypto.kek",
    );
}

#[test]
fn malformed_admin_token_hash() {
    dev(
        &[
            ("SEC_AUTH__ADMIN_TOKEN_HASH", "sha256:not-hex"),
            ("SEC_CRYPTO__KEK", KEK_32),
        ],
        "auth.admin_token_hash",
    );
}

#[test]
fn unknown_key_in_a_service_section() {
    dev(&[("SEC_CRYPTO__KEK_FLIE", "/x")], "kek_flie");
}

#[test]
fn service_section_value_out_of_range() {
    dev(
        &[("SEC_CRYPTO__MAX_PAYLOAD_BYTES", "0")],
        "crypto.max_payload_bytes",
    );
}

#[test]
fn check_config_runs_the_same_checks() {
    assert_config_error(
        SECD,
        &["check-config"],
        "crypto",
        &[("SEC_CRYPTO__KEK", "dG9vIHNob3J0")],
        "crypto.kek",
    );
}

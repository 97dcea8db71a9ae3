//! The real `secctl` binary against the whole platform started in-process: key
//! management, encrypt/decrypt through stdin, backup/restore, error reporting and exit
//! codes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use sec_tests::{Backends, TestPlatform};

mod common;
use common::Env;

fn find<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secctl_against_the_platform() {
    let tp = TestPlatform::start(Backends::Embedded).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(&tp, dir.path(), Some(&tp.token));

    // status: all seven SERVING
    let r = env.run(&["status"], b"").await.ok();
    assert_eq!(r.out().matches("SERVING").count(), 7, "{}", r.out());

    // create
    let r = env
        .run(&["key", "create", "orders", "--type", "aes256-gcm"], b"")
        .await
        .ok();
    assert!(r.out().contains("orders"), "{}", r.out());
    let signer = env
        .run(
            &[
                "key",
                "create",
                "signer",
                "--type",
                "ed25519",
                "--rotation-period",
                "30d",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(signer["rotation_period_seconds"], 30 * 86_400);
    assert_eq!(signer["type"], "ed25519");

    // bad duration / type: usage errors, nothing sent
    for args in [
        &[
            "key",
            "create",
            "x",
            "--type",
            "ed25519",
            "--rotation-period",
            "soon",
        ][..],
        &["key", "create", "x", "--type", "rsa3072"][..],
        &["key", "config", "orders", "--exportable", "maybe"][..],
    ] {
        let r = env.run(args, b"").await;
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
    }

    // list
    let list = env
        .run(&["key", "list", "-o", "json"], b"")
        .await
        .ok()
        .json();
    // Besides the two created here, only services' own keys (token-svc's sealing key).
    let created = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| !k["name"].as_str().unwrap().starts_with("svc."))
        .count();
    assert_eq!(created, 2, "{list}");
    let orders = find(&list, "orders");
    assert_eq!(orders["type"], "aes256-gcm");
    assert_eq!(orders["latest_version"], 1);
    assert_eq!(orders["deletion_allowed"], false);
    assert!(orders["versions"][0].get("public_key_pem").is_none());
    let pem = find(&list, "signer")["versions"][0]["public_key_pem"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let table = env.run(&["key", "list"], b"").await.ok().out();
    let header: Vec<_> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "LATEST",
            "MIN_DEC",
            "ROTATION",
            "EXPORTABLE",
            "DELETABLE"
        ]
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["signer", "ed25519", "1", "0", "30d", "no", "no"]),
        "{table}"
    );
    let public = env.run(&["key", "public", "signer"], b"").await.ok().out();
    assert_eq!(public.trim_end(), pem.trim_end());

    // encrypt / decrypt through stdin: bytes survive exactly (non-UTF-8, trailing newline)
    let secret: &[u8] = b"card 4111-1111\xff\x00\xfe tail\n";
    let r = env
        .run(&["encrypt", "orders", "--aad", "tenant-1"], secret)
        .await
        .ok();
    let ct_v1 = r.out();
    assert!(
        ct_v1.starts_with("sec:v1:") && ct_v1.ends_with('\n'),
        "{ct_v1}"
    );
    let r = env
        .run(
            &["decrypt", "orders", "--aad", "tenant-1"],
            ct_v1.as_bytes(),
        )
        .await
        .ok();
    assert_eq!(r.stdout, secret);
    // surrounding whitespace in the ciphertext input is ignored
    let padded = format!("  \n{}\n\n", ct_v1.trim());
    let r = env
        .run(
            &["decrypt", "orders", "--aad", "tenant-1"],
            padded.as_bytes(),
        )
        .await
        .ok();
    assert_eq!(r.stdout, secret);

    // wrong AAD: exit 1, the gRPC code on stderr, no plaintext anywhere
    let r = env
        .run(
            &["decrypt", "orders", "--aad", "tenant-2"],
            ct_v1.as_bytes(),
        )
        .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("secctl: InvalidArgument: "),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    assert!(!r.stderr.contains("4111"));

    // --in FILE
    let file = dir.path().join("plain.bin");
    std::fs::write(&file, secret).unwrap();
    let ct_file = env
        .run(&["encrypt", "orders", "--in", file.to_str().unwrap()], b"")
        .await
        .ok()
        .out();
    let ct_path = dir.path().join("ct.txt");
    std::fs::write(&ct_path, &ct_file).unwrap();
    let r = env
        .run(
            &["decrypt", "orders", "--in", ct_path.to_str().unwrap()],
            b"",
        )
        .await
        .ok();
    assert_eq!(r.stdout, secret);

    // rotate: latest 2, new ciphertexts use it, the old one still decrypts
    let rotated = env
        .run(&["key", "rotate", "orders", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(rotated["latest_version"], 2);
    assert_eq!(rotated["versions"].as_array().unwrap().len(), 2);
    let ct_v2 = env.run(&["encrypt", "orders"], b"x").await.ok().out();
    assert!(ct_v2.starts_with("sec:v2:"), "{ct_v2}");
    let r = env
        .run(
            &["decrypt", "orders", "--aad", "tenant-1"],
            ct_v1.as_bytes(),
        )
        .await
        .ok();
    assert_eq!(r.stdout, secret);

    // config: only the given flags change; then the old version can be retired
    let cfg = env
        .run(
            &[
                "key",
                "config",
                "orders",
                "--min-decryption-version",
                "2",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(cfg["min_decryption_version"], 2);
    assert_eq!(cfg["deletion_allowed"], false);
    assert_eq!(cfg["rotation_period_seconds"], 0);
    let r = env
        .run(
            &["decrypt", "orders", "--aad", "tenant-1"],
            ct_v1.as_bytes(),
        )
        .await;
    assert_eq!(
        r.code, 1,
        "v1 ciphertext refused below min_decryption_version"
    );
    assert!(r.stdout.is_empty());

    // delete: refused on a protected key, allowed once configured
    let r = env.run(&["key", "delete", "orders"], b"").await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("secctl: FailedPrecondition: "),
        "{}",
        r.stderr
    );
    let cfg = env
        .run(
            &[
                "key",
                "config",
                "orders",
                "--deletion-allowed",
                "true",
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(cfg["deletion_allowed"], true);
    assert_eq!(cfg["min_decryption_version"], 2, "unchanged");
    env.run(&["key", "delete", "orders"], b"").await.ok();
    let r = env.run(&["key", "get", "orders"], b"").await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("secctl: NotFound: "), "{}", r.stderr);

    // backup to a private file, restore under a new name, the copy decrypts
    env.run(
        &["key", "create", "wrap", "--type", "rsa-3072-wrapping"],
        b"",
    )
    .await
    .ok();
    let wrap_pem = dir.path().join("wrap.pem");
    let r = env.run(&["key", "public", "wrap"], b"").await.ok();
    std::fs::write(&wrap_pem, &r.stdout).unwrap();
    // this installation's backup-signing key, pinned by the restoring side
    let source_pem = dir.path().join("source.pem");
    let r = env.run(&["key", "installation-key"], b"").await.ok();
    assert!(r.stdout.starts_with(b"-----BEGIN PUBLIC KEY-----"));
    std::fs::write(&source_pem, &r.stdout).unwrap();
    let ik = env
        .run(&["key", "installation-key", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert_eq!(ik["public_key_pem"].as_str().unwrap().as_bytes(), r.stdout);
    assert_eq!(ik["fingerprint"].as_str().unwrap().len(), 64);
    let source_arg = source_pem.to_str().unwrap();
    env.run(
        &[
            "key",
            "create",
            "exp",
            "--type",
            "chacha20-poly1305",
            "--exportable",
        ],
        b"",
    )
    .await
    .ok();
    let ct_exp = env.run(&["encrypt", "exp"], secret).await.ok().out();
    let backup = dir.path().join("exp.backup");
    let wrap_arg = wrap_pem.to_str().unwrap();
    let backup_arg = backup.to_str().unwrap();
    let r = env
        .run(
            &[
                "key",
                "backup",
                "exp",
                "--wrapping-key-file",
                wrap_arg,
                "--out",
                backup_arg,
            ],
            b"",
        )
        .await
        .ok();
    assert!(r.stdout.is_empty(), "backup went to the file, not stdout");
    assert!(
        std::fs::read_to_string(&backup)
            .unwrap()
            .starts_with("sec-backup:v2:")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let r = env
        .run(
            &[
                "key",
                "backup",
                "orders-gone",
                "--wrapping-key-file",
                wrap_arg,
            ],
            b"",
        )
        .await;
    assert_eq!(r.code, 1);
    let r = env
        .run(
            &["key", "backup", "signer", "--wrapping-key-file", wrap_arg],
            b"",
        )
        .await;
    assert_eq!(r.code, 1, "signer is not exportable");
    let restored = env
        .run(
            &[
                "key",
                "restore",
                "--wrapping-key",
                "wrap",
                "--source-key-file",
                source_arg,
                "--new-name",
                "exp-copy",
                "--in",
                backup_arg,
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(restored["name"], "exp-copy");
    // pinned to the wrong key: refused, nothing restored
    let r = env
        .run(
            &[
                "key",
                "restore",
                "--wrapping-key",
                "wrap",
                "--source-key-file",
                wrap_arg,
                "--new-name",
                "exp-wrong-pin",
                "--in",
                backup_arg,
            ],
            b"",
        )
        .await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("secctl: InvalidArgument: "),
        "{}",
        r.stderr
    );
    // backup as JSON carries the source key for the operator to hand over
    let j = env
        .run(
            &[
                "key",
                "backup",
                "exp",
                "--wrapping-key-file",
                wrap_arg,
                "-o",
                "json",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert!(j["backup"].as_str().unwrap().starts_with("sec-backup:v2:"));
    assert_eq!(
        j["source_public_key_pem"].as_str().unwrap(),
        ik["public_key_pem"].as_str().unwrap()
    );
    assert_eq!(restored["type"], "chacha20-poly1305");
    let r = env
        .run(&["decrypt", "exp-copy"], ct_exp.as_bytes())
        .await
        .ok();
    assert_eq!(r.stdout, secret);
    // backup on stdout, restore from stdin
    let on_stdout = env
        .run(
            &["key", "backup", "exp", "--wrapping-key-file", wrap_arg],
            b"",
        )
        .await
        .ok()
        .out();
    assert!(on_stdout.starts_with("sec-backup:v2:"));
    env.run(
        &[
            "key",
            "restore",
            "--wrapping-key",
            "wrap",
            "--source-key-file",
            source_arg,
            "--new-name",
            "exp-copy2",
        ],
        on_stdout.as_bytes(),
    )
    .await
    .ok();

    // KEK rotation reports its counts
    let kek = env
        .run(&["kek", "rotate", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert!(kek["rewrapped"].is_u64() && kek["already_current"].is_u64());
    assert!(!kek["current_kek_id"].as_str().unwrap().is_empty());
    let kek = env.run(&["kek", "rotate"], b"").await.ok().out();
    assert!(kek.contains("current_kek_id:"), "{kek}");

    // the audit trail still answers through the same helpers
    let events = env
        .run(&["audit", "list", "--limit", "5", "-o", "json"], b"")
        .await
        .ok()
        .json();
    assert!(events.is_array(), "{events}");

    // credentials: a wrong token is refused by the server; none at all is refused locally
    let wrong = sec_common::auth::generate_token().unwrap();
    let r = Env::new(&tp, dir.path(), Some(&wrong))
        .run(&["key", "list"], b"")
        .await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("secctl: Unauthenticated: "),
        "{}",
        r.stderr
    );
    let r = Env::new(&tp, dir.path(), None)
        .run(&["key", "list"], b"")
        .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no token"), "{}", r.stderr);

    let (r, _) = tp.stop().await;
    r.unwrap();
}

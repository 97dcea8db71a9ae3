//! Every event type the platform emits. audit-svc dead-letters an event of any other type
//! (`unknown_type`) instead of storing it: the audit trail holds what the platform's code
//! says, not whatever someone managed to publish on the stream.
//!
//! Two kinds of types:
//! - [`EVENT_TYPES`]: written as string literals in the services' code;
//! - generated for each of [`SERVICES`]: `sec.<svc>.service.{started,stopped}`
//!   (`service.rs`, lifecycle) and `sec.<svc>.event.dead_lettered` (the bus's dead-letter
//!   summary, and audit-svc's own for what it could not store).
//!
//! The test `catalog_matches_the_sources` keeps this list honest: it scans
//! `crates/*/src/**/*.rs` (test modules and `tests.rs` files left out) for string literals
//! of the type grammar and fails when one is missing here, when an entry here appears
//! nowhere, or when a new `format!("sec.…")` builds types the generated rule does not
//! know. Adding an event type to code without adding it here therefore fails CI.
//!
//! The edge's `sec.ip.*` / `sec.ratelimit.*` types are listed because sec-edge emits
//! them; note that their service token (`ip`, `ratelimit`) is not the emitting service
//! (`auth`), so the bus refuses them at publish (`invalid`) until sec-edge or the rule
//! changes.

/// Services that emit events (each `crates/<name>-svc`).
pub const SERVICES: &[&str] = &[
    "assess", "audit", "auth", "crypto", "gdpr", "session", "token",
];

/// `<noun>.<verb>` generated for every service in [`SERVICES`].
pub const GENERATED_SUFFIXES: &[&str] =
    &["service.started", "service.stopped", "event.dead_lettered"];

/// Literal event types, sorted.
pub const EVENT_TYPES: &[&str] = &[
    "sec.audit.alert.acknowledged",
    "sec.audit.alert.raised",
    "sec.audit.hold.created",
    "sec.audit.hold.released",
    "sec.auth.client.auth_failed",
    "sec.auth.client.created",
    "sec.auth.client.deleted",
    "sec.auth.client.secret_rotated",
    "sec.auth.client.updated",
    "sec.auth.code.issued",
    "sec.auth.code.replayed",
    "sec.auth.consent.denied",
    "sec.auth.consent.granted",
    "sec.auth.login.failed",
    "sec.auth.login.succeeded",
    "sec.auth.logout",
    "sec.auth.token.granted",
    "sec.auth.token.revoked",
    "sec.auth.user.created",
    "sec.auth.user.disabled",
    "sec.auth.user.locked",
    "sec.auth.user.password_changed",
    "sec.auth.user.updated",
    "sec.crypto.decrypt.failed",
    "sec.crypto.kek.rotated",
    "sec.crypto.key.backed_up",
    "sec.crypto.key.config_updated",
    "sec.crypto.key.created",
    "sec.crypto.key.delete_refused",
    "sec.crypto.key.deleted",
    "sec.crypto.key.integrity_failed",
    "sec.crypto.key.restored",
    "sec.crypto.key.rotated",
    "sec.ip.auto_blocked",
    "sec.ip.blocked",
    "sec.ratelimit.exceeded",
    "sec.ratelimit.store_failed",
    "sec.ratelimit.sustained",
    "sec.session.binding.violated",
    "sec.session.limit.evicted",
    "sec.session.session.created",
    "sec.session.session.revoked",
    "sec.session.session.rotated",
    "sec.token.issue.failed",
    "sec.token.key.activated",
    "sec.token.key.created",
    "sec.token.key.retired",
    "sec.token.key.retiring",
    "sec.token.key.revoked",
    "sec.token.refresh.reuse_detected",
    "sec.token.revoked",
];

/// Whether the platform emits events of this type.
pub fn is_known(event_type: &str) -> bool {
    if EVENT_TYPES.binary_search(&event_type).is_ok() {
        return true;
    }
    let Some(rest) = event_type.strip_prefix("sec.") else {
        return false;
    };
    let Some((service, suffix)) = rest.split_once('.') else {
        return false;
    };
    SERVICES.contains(&service) && GENERATED_SUFFIXES.contains(&suffix)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn lookup() {
        assert!(
            EVENT_TYPES.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique"
        );
        assert!(is_known("sec.crypto.key.created"));
        assert!(is_known("sec.audit.event.dead_lettered"));
        assert!(is_known("sec.gdpr.service.started"));
        assert!(!is_known("sec.nobody.service.started"));
        assert!(!is_known("sec.crypto.key.exploded"));
        assert!(!is_known("sec.audit.test.happened"));
        assert!(!is_known("crypto.key.created"));
        assert!(!is_known(""));
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "tests") {
                    rust_files(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs")
                // Test-only modules in files of their own (`tests.rs`, `chain_tests.rs`).
                && p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n != "tests.rs" && !n.ends_with("_tests.rs")
                })
                // The catalog itself lists every type.
                && !p.ends_with("events/catalog.rs")
            {
                out.push(p);
            }
        }
    }

    /// `src` without the items under `#[cfg(test)]`: a `{…}` block (braces balanced,
    /// string literals skipped) or a `mod x;` declaration.
    fn without_tests(src: &str) -> String {
        let b = src.as_bytes();
        let mut out = String::new();
        let mut i = 0;
        while let Some(j) = src[i..].find("#[cfg(test)]").map(|j| i + j) {
            out.push_str(&src[i..j]);
            let brace = src[j..].find('{').map(|k| j + k);
            let semi = src[j..].find(';').map(|k| j + k);
            match (brace, semi) {
                (_, Some(s)) if brace.is_none_or(|b| s < b) => i = s + 1,
                (Some(start), _) => {
                    let (mut depth, mut k, mut in_str) = (0usize, start, false);
                    while k < b.len() {
                        match b[k] {
                            b'\\' if in_str => k += 1,
                            b'"' => in_str = !in_str,
                            b'{' if !in_str => depth += 1,
                            b'}' if !in_str => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        k += 1;
                    }
                    i = (k + 1).min(src.len());
                }
                _ => return out,
            }
        }
        out.push_str(&src[i..]);
        out
    }

    /// String literals of the type grammar (what the bus accepts as a type), proto
    /// package names (`sec.crypto.v1`) aside.
    fn type_literals(src: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (start, _) in src.match_indices("\"sec.") {
            let body = &src[start + 1..];
            let Some(end) = body.find('"') else { continue };
            let lit = &body[..end];
            let is_proto = lit.rsplit('.').next().is_some_and(|t| {
                t.len() > 1 && t.starts_with('v') && t[1..].chars().all(|c| c.is_ascii_digit())
            });
            if crate::events::type_service(lit).is_some() && !is_proto {
                found.push(lit.to_owned());
            }
        }
        found
    }

    /// The rule: every literal of the type grammar in non-test code of any crate is an
    /// event type, so it must be in the catalog; every catalog entry must still be in the
    /// code; and the only `format!`s that build types are the two generated families.
    /// Literal scanning (rather than `new_event(` call sites) also catches types that
    /// travel through helpers (`self.event("…")`, match arms, tables).
    #[test]
    fn catalog_matches_the_sources() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = Vec::new();
        let mut services = BTreeSet::new();
        for krate in std::fs::read_dir(root.join("crates")).unwrap().flatten() {
            let name = krate.file_name().to_string_lossy().into_owned();
            if let Some(svc) = name.strip_suffix("-svc") {
                services.insert(svc.to_owned());
            }
            rust_files(&krate.path().join("src"), &mut files);
        }
        assert!(files.len() > 50, "found only {} source files", files.len());
        let mut in_code: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut formats = BTreeSet::new();
        for f in &files {
            let src = without_tests(&std::fs::read_to_string(f).unwrap());
            for t in type_literals(&src) {
                in_code.entry(t).or_insert_with(|| f.clone());
            }
            for (at, _) in src.match_indices("format!(\"sec.") {
                let line = &src[at..src[at..].find('\n').map_or(src.len(), |n| at + n)];
                formats.insert(line.trim().to_owned());
            }
        }
        let missing: Vec<String> = in_code
            .iter()
            .filter(|(t, _)| !is_known(t))
            .map(|(t, f)| format!("{t} ({})", f.display()))
            .collect();
        assert!(
            missing.is_empty(),
            "event types in code but not in events/catalog.rs: {missing:?}"
        );
        let stale: Vec<&str> = EVENT_TYPES
            .iter()
            .copied()
            .filter(|t| !in_code.contains_key(*t))
            .collect();
        assert!(stale.is_empty(), "catalog entries no code emits: {stale:?}");
        assert_eq!(
            services,
            SERVICES.iter().map(|s| (*s).to_owned()).collect(),
            "catalog::SERVICES must name every crates/<name>-svc"
        );
        let want: BTreeSet<String> = [
            r#"format!("sec.{}.service.{verb}", self.name),"#,
            r#"format!("sec.{}.{DEAD_LETTER_SUMMARY}", original.service),"#,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(
            formats, want,
            "a new format!(\"sec.…\") builds event types: add its family to GENERATED_SUFFIXES"
        );
    }

    #[test]
    fn the_scanner_sees_what_it_must() {
        let src = r#"
            fn a() { emit("sec.new.thing.happened"); let p = "sec.crypto.v1"; }
            #[cfg(test)]
            mod tests { fn t() { emit("sec.test.only.type"); let s = "}"; } }
            fn b() { x("sec.other.done") }
        "#;
        let found = type_literals(&without_tests(src));
        assert_eq!(found, ["sec.new.thing.happened", "sec.other.done"]);
        assert!(!is_known("sec.new.thing.happened"), "would fail the scan");
    }
}

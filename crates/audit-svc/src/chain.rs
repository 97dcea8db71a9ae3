//! The hash chain that makes the audit trail tamper-evident, and its signed checkpoints.
//!
//! Every stored event has a position `seq` (1, 2, 3, … with no gaps) and
//! `hash = SHA-256(previous hash ‖ canonical(seq, record))`, the previous hash of
//! position 1 being 32 zero bytes. [`canonical`] is specified byte for byte in
//! `crates/audit-svc/docs/chain.md` so that a tool outside this code base can recompute
//! every hash (`tests/interop/audit_chain_verify.py` does).
//!
//! One linear chain across replicas: every writer takes the row lock of the chain head
//! (`audit_chain_head`, `SELECT … FOR UPDATE` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite)
//! for the length of its batch transaction. The database is the sequencer: no leader
//! election, no coordination service, and a replica that dies mid-batch releases the lock
//! with its connection. The cost is that batches commit one at a time; a batch of 1000
//! holds the lock for a few milliseconds, and one writer already saturates the database.
//!
//! A checkpoint is a signed statement of the head at some position, in the form of the
//! transparency-log checkpoints (RFC 9162 §4.10 / Sigstore's signed notes), see
//! [`checkpoint_note`]. It is signed by a crypto-svc Ed25519 key that audit-svc cannot
//! export, so whoever can rewrite the database (and recompute every hash) still cannot
//! forge the checkpoints, and verification starting from a checkpoint is incremental.

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine as _;

use crate::store::{Row, StoreError};

/// The previous hash of position 1.
pub const GENESIS: [u8; 32] = [0; 32];
/// First field of every canonical record: the encoding's version.
pub const CANONICAL_TAG: &str = "sec-audit-chain-v1";
/// First line of every checkpoint note.
pub const CHECKPOINT_TAG: &str = "sec-audit-checkpoint-v1";

pub type Hash = [u8; 32];

/// Appends `len(bytes)` as a 4-byte big-endian integer, then `bytes`.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Fields are bounded far below 4 GiB (events are at most 64 KiB on the bus).
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The bytes that are hashed for the record at `seq` (see `docs/chain.md`). The details
/// are taken from the stored JSON object (string values only) in key order, so the JSON
/// text itself (key order, whitespace, JSONB's normalisation) does not matter.
pub fn canonical(seq: u64, row: &Row) -> Result<Vec<u8>, StoreError> {
    let details: BTreeMap<String, String> = serde_json::from_str(&row.details)
        .map_err(|e| StoreError::Corrupt(format!("details are not a string map: {e}")))?;
    // An address is hashed in the form Rust's `IpAddr` prints it, whatever text the
    // database hands back for it.
    let ip = row
        .ip_address
        .as_deref()
        .map(|s| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| ip.to_string())
                .map_err(|_| StoreError::Corrupt(format!("stored address `{s}`")))
        })
        .transpose()?
        .unwrap_or_default();
    let mut out = Vec::with_capacity(256 + row.details.len());
    field(&mut out, CANONICAL_TAG.as_bytes());
    field(&mut out, seq.to_string().as_bytes());
    field(&mut out, row.id.hyphenated().to_string().as_bytes());
    field(&mut out, row.event_type.as_bytes());
    field(&mut out, row.time_us.to_string().as_bytes());
    field(&mut out, row.received_us.to_string().as_bytes());
    field(&mut out, row.service.as_bytes());
    field(&mut out, row.actor_kind.as_bytes());
    field(&mut out, row.actor_id.as_bytes());
    field(&mut out, row.subject.as_bytes());
    field(&mut out, ip.as_bytes());
    field(&mut out, row.outcome.as_bytes());
    field(&mut out, row.severity.as_bytes());
    field(&mut out, details.len().to_string().as_bytes());
    for (k, v) in &details {
        field(&mut out, k.as_bytes());
        field(&mut out, v.as_bytes());
    }
    field(&mut out, row.trace_id.as_bytes());
    Ok(out)
}

/// `SHA-256(prev ‖ canonical)`.
pub fn link(prev: &Hash, canonical: &[u8]) -> Hash {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev);
    ctx.update(canonical);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The next hash after `prev` for `row` at `seq`.
pub fn next_hash(prev: &Hash, seq: u64, row: &Row) -> Result<Hash, StoreError> {
    Ok(link(prev, &canonical(seq, row)?))
}

pub fn hex(h: &[u8]) -> String {
    use std::fmt::Write as _;
    h.iter()
        .fold(String::with_capacity(h.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The position and hash of the newest record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: GENESIS,
    };
}

/// A stored record with its place in the chain.
#[derive(Debug, Clone)]
pub struct Chained {
    pub seq: u64,
    pub hash: Vec<u8>,
    pub row: Row,
}

/// A signed head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub head_hash: Hash,
    pub time_us: i64,
    /// Names the installation: `sec-audit/<audit-svc instance id>`, so a checkpoint of
    /// another installation never verifies here.
    pub origin: String,
    pub key_name: String,
    pub key_version: u32,
    /// crypto-svc's `sec:v<version>:<base64>` form.
    pub signature: String,
}

impl Checkpoint {
    pub fn note(&self) -> String {
        checkpoint_note(&self.origin, self.seq, &self.head_hash, self.time_us)
    }
}

/// The signed text of a checkpoint: five lines, each ending in `\n`:
/// `sec-audit-checkpoint-v1`, the origin, the position (decimal), the head hash
/// (standard base64) and the time (microseconds since the epoch, decimal).
pub fn checkpoint_note(origin: &str, seq: u64, head: &Hash, time_us: i64) -> String {
    format!(
        "{CHECKPOINT_TAG}\n{origin}\n{seq}\n{}\n{time_us}\n",
        base64::engine::general_purpose::STANDARD.encode(head)
    )
}

/// First line of every prune statement.
pub const PRUNE_TAG: &str = "sec-audit-prune-v1";

/// Why a run of positions was removed.
pub const PRUNE_RETENTION: &str = "retention";
pub const PRUNE_PARTITION: &str = "partition";

/// A run of consecutive positions removed by retention: verification accepts the gap
/// `first_seq..=last_seq` and continues from `last_hash` (the hash at `last_seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prune {
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: Hash,
    /// Rows removed (fewer than the positions when earlier removals lie inside).
    pub rows: u64,
    /// [`PRUNE_RETENTION`] (deleted by range) or [`PRUNE_PARTITION`] (partition dropped).
    pub reason: String,
}

/// The prunes of one retention run, signed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneRun {
    /// Assigned by the store (0 before it is stored).
    pub id: i64,
    pub time_us: i64,
    pub origin: String,
    pub key_name: String,
    pub key_version: u32,
    pub signature: String,
    pub prunes: Vec<Prune>,
}

impl PruneRun {
    pub fn statement(&self) -> String {
        prune_statement(&self.origin, self.time_us, &self.prunes)
    }
}

/// The signed text of a retention run (see `docs/chain.md`): `sec-audit-prune-v1`, the
/// origin, the time (microseconds since the epoch), the number of runs, then one line per
/// removed run in ascending order of its first position:
/// `<first_seq> <last_seq> <hash at last_seq, standard base64> <rows> <reason>`. Every
/// line ends in `\n`.
pub fn prune_statement(origin: &str, time_us: i64, prunes: &[Prune]) -> String {
    let mut sorted: Vec<&Prune> = prunes.iter().collect();
    sorted.sort_by_key(|p| p.first_seq);
    let mut s = format!("{PRUNE_TAG}\n{origin}\n{time_us}\n{}\n", sorted.len());
    for p in sorted {
        s.push_str(&format!(
            "{} {} {} {} {}\n",
            p.first_seq,
            p.last_seq,
            base64::engine::general_purpose::STANDARD.encode(p.last_hash),
            p.rows,
            p.reason
        ));
    }
    s
}

/// Signs and verifies checkpoint notes. Production: a crypto-svc Ed25519 key
/// ([`crate::signer::CryptoSigner`]).
#[async_trait]
pub trait CheckpointSigner: Send + Sync + 'static {
    /// `(key name, key version, signature)`.
    async fn sign(&self, message: &[u8]) -> Result<(String, u32, String), SignError>;
    async fn verify(
        &self,
        key_name: &str,
        message: &[u8],
        signature: &str,
    ) -> Result<bool, SignError>;
}

#[derive(Debug, thiserror::Error)]
#[error("checkpoint signer: {0}")]
pub struct SignError(pub String);

/// What a verification found first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The record at `first_bad_seq` does not hash to the stored value from the
    /// previous one: it (or its hash) was changed.
    Modified,
    /// There is no record at `first_bad_seq` although later ones exist (deleted).
    Missing,
    /// A record outside the chain: stored without a position, or beyond the head.
    Inserted,
    /// The records hash consistently, but not to what a signed checkpoint (or the head)
    /// says: the chain was rewritten from some point on.
    CheckpointMismatch,
    /// A checkpoint's (or a prune record's) signature does not verify.
    BadSignature,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Modified => "modified",
            Problem::Missing => "missing",
            Problem::Inserted => "inserted",
            Problem::CheckpointMismatch => "checkpoint_mismatch",
            Problem::BadSignature => "bad_signature",
        }
    }
}

/// Outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// First position checked (after the anchor).
    pub from_seq: u64,
    /// Last position checked.
    pub to_seq: u64,
    pub records: u64,
    pub checkpoints: u64,
    /// The signed checkpoint verification started from (`None`: from the start).
    pub anchor_seq: Option<u64>,
    /// The running hash at `to_seq`.
    pub hash: Hash,
    pub failure: Option<Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub problem: Problem,
    /// The first bad position (0 when the bad record has none: an unpositioned insert).
    pub seq: u64,
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            id: uuid::Uuid::parse_str("0190c2a4-7d3e-7b7a-9f6e-3c1d2b4a5e6f").unwrap(),
            event_type: "sec.auth.login.failed".into(),
            time_us: 1_767_225_600_123_456,
            received_us: 1_767_225_600_200_000,
            service: "auth".into(),
            user_id: None,
            actor_kind: "user".into(),
            actor_id: "alice".into(),
            subject: "user:alice".into(),
            ip_address: Some("2001:db8::1".into()),
            outcome: "failure".into(),
            severity: "medium".into(),
            details: r#"{"reason":"bad password","attempt":"3"}"#.into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        }
    }

    /// The worked example of docs/chain.md: if this changes, the document (and every
    /// outside verifier) is wrong.
    #[test]
    fn canonical_encoding_is_the_documented_one() {
        let c = canonical(1, &row()).unwrap();
        let mut want = Vec::new();
        for f in [
            "sec-audit-chain-v1",
            "1",
            "0190c2a4-7d3e-7b7a-9f6e-3c1d2b4a5e6f",
            "sec.auth.login.failed",
            "1767225600123456",
            "1767225600200000",
            "auth",
            "user",
            "alice",
            "user:alice",
            "2001:db8::1",
            "failure",
            "medium",
            "2",
            "attempt",
            "3",
            "reason",
            "bad password",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            want.extend_from_slice(&(f.len() as u32).to_be_bytes());
            want.extend_from_slice(f.as_bytes());
        }
        assert_eq!(c, want);
        assert_eq!(
            hex(&link(&GENESIS, &c)),
            "21f5625c176702c7aaa2ea46a191e6c54953d3de5c51d9f5cdf503b1208c8ee3",
            "update docs/chain.md's worked example if this is deliberate"
        );
    }

    #[test]
    fn json_form_and_address_spelling_do_not_change_the_hash() {
        let a = row();
        let mut b = row();
        b.details = r#"{ "attempt" : "3", "reason": "bad password" }"#.into();
        b.ip_address = Some("2001:0db8:0000::0001".into());
        assert_eq!(canonical(7, &a).unwrap(), canonical(7, &b).unwrap());
        let mut c = row();
        c.subject = "user:mallory".into();
        assert_ne!(canonical(7, &a).unwrap(), canonical(7, &c).unwrap());
        assert_ne!(canonical(7, &a).unwrap(), canonical(8, &a).unwrap());
        let mut d = row();
        d.details = r#"{"n": 3}"#.into();
        assert!(
            canonical(1, &d).is_err(),
            "non-string detail values are not ours"
        );
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let mut a = row();
        a.actor_id = "ab".into();
        a.subject = "c".into();
        let mut b = row();
        b.actor_id = "a".into();
        b.subject = "bc".into();
        assert_ne!(canonical(1, &a).unwrap(), canonical(1, &b).unwrap());
    }

    #[test]
    fn prune_statement_format() {
        let p = |first, last, rows, reason: &str| Prune {
            first_seq: first,
            last_seq: last,
            last_hash: [1u8; 32],
            rows,
            reason: reason.into(),
        };
        let s = prune_statement(
            "sec-audit/x",
            7,
            &[p(11, 20, 9, PRUNE_RETENTION), p(1, 10, 10, PRUNE_PARTITION)],
        );
        assert_eq!(
            s,
            "sec-audit-prune-v1\nsec-audit/x\n7\n2\n\
             1 10 AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE= 10 partition\n\
             11 20 AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE= 9 retention\n"
        );
    }

    #[test]
    fn checkpoint_note_format() {
        let n = checkpoint_note("sec-audit/x", 42, &[1u8; 32], 5);
        assert_eq!(
            n,
            "sec-audit-checkpoint-v1\nsec-audit/x\n42\nAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n5\n"
        );
    }
}

//! Verification of the hash chain (see [`crate::chain`]) and the checkpointer that signs
//! its head.

use std::collections::HashSet;

use crate::chain::{
    Checkpoint, CheckpointSigner, Failure, GENESIS, Hash, Problem, Prune, Report, checkpoint_note,
    next_hash,
};
use crate::store::{ChainStore, Outside, StoreError};

/// Records read per query.
const PAGE: u32 = 2000;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Signer(#[from] crate::chain::SignError),
}

/// Whether `cp` is a checkpoint of this installation with a good signature.
async fn checkpoint_ok(
    signer: &dyn CheckpointSigner,
    origin: &str,
    cp: &Checkpoint,
) -> Result<Option<Failure>, VerifyError> {
    if cp.origin != origin {
        return Ok(Some(Failure {
            problem: Problem::BadSignature,
            seq: cp.seq,
            detail: format!(
                "checkpoint at {} names origin `{}`, not this installation",
                cp.seq, cp.origin
            ),
        }));
    }
    if signer
        .verify(&cp.key_name, cp.note().as_bytes(), &cp.signature)
        .await?
    {
        Ok(None)
    } else {
        Ok(Some(Failure {
            problem: Problem::BadSignature,
            seq: cp.seq,
            detail: format!(
                "the signature of the checkpoint at {} does not verify",
                cp.seq
            ),
        }))
    }
}

/// Checks positions `from..=to` (`to` 0: the head). Starts from the newest signed
/// checkpoint before `from` (its signature checked first), recomputes every hash, checks
/// every checkpoint on the way and, when the range reaches the head, the head itself;
/// then looks for rows outside the chain.
pub async fn verify(
    store: &dyn ChainStore,
    signer: &dyn CheckpointSigner,
    origin: &str,
    from: u64,
    to: u64,
) -> Result<Report, VerifyError> {
    let head = store.head().await?;
    let to = if to == 0 || to > head.seq {
        head.seq
    } else {
        to
    };
    let from = from.max(1);
    let mut report = Report {
        from_seq: from,
        to_seq: to,
        records: 0,
        checkpoints: 0,
        anchor_seq: None,
        hash: GENESIS,
        failure: None,
    };
    let mut prev: Hash = GENESIS;
    let mut next = 1;
    if from > 1
        && let Some(cp) = store.checkpoint_at_or_before(from - 1).await?
    {
        report.checkpoints += 1;
        if let Some(f) = checkpoint_ok(signer, origin, &cp).await? {
            report.failure = Some(f);
            return Ok(report);
        }
        prev = cp.head_hash;
        next = cp.seq + 1;
        report.anchor_seq = Some(cp.seq);
    }
    report.from_seq = next;
    if let Some(f) = walk(store, signer, origin, &mut report, &mut prev, next, to).await? {
        report.failure = Some(f);
        return Ok(report);
    }
    report.hash = prev;
    if to == head.seq && to > 0 && prev != head.hash {
        report.failure = Some(Failure {
            problem: Problem::CheckpointMismatch,
            seq: to,
            detail: "the records do not hash to the recorded head".into(),
        });
        return Ok(report);
    }
    let outside = match store.outside_chain(head.seq).await? {
        // Stored since `head` was read? A batch commits its rows and the head together,
        // so a head read now covers every row seen above.
        Some(Outside::BeyondHead(seq)) if seq <= store.head().await?.seq => None,
        o => o,
    };
    report.failure = outside.map(|o| match o {
        Outside::Unpositioned(id) => Failure {
            problem: Problem::Inserted,
            seq: 0,
            detail: format!("event {id} is stored without a place in the chain"),
        },
        Outside::BeyondHead(seq) => Failure {
            problem: Problem::Inserted,
            seq,
            detail: format!("a record at {seq} lies beyond the head ({})", head.seq),
        },
    });
    Ok(report)
}

/// Recomputes `next..=to` onto `prev`; the first failure, if any. A position without a
/// record is accepted only as part of a signed prune record (retention), after which the
/// running hash continues from the hash the record names.
async fn walk(
    store: &dyn ChainStore,
    signer: &dyn CheckpointSigner,
    origin: &str,
    report: &mut Report,
    prev: &mut Hash,
    mut next: u64,
    to: u64,
) -> Result<Option<Failure>, VerifyError> {
    let mut runs = HashSet::new();
    while next <= to {
        let rows = store.chained(next, to, PAGE).await?;
        let page_end = rows.last().map_or(to, |r| r.seq);
        let mut checkpoints = store.checkpoints(next, page_end, PAGE).await?.into_iter();
        let mut cp = checkpoints.next();
        if rows.is_empty() {
            match gap(store, signer, origin, &mut runs, next).await? {
                Ok(p) => {
                    *prev = p.last_hash;
                    report.to_seq = p.last_seq.min(to);
                    next = p.last_seq + 1;
                    continue;
                }
                Err(f) => return Ok(Some(f)),
            }
        }
        for r in rows {
            let mut jumped = false;
            while r.seq > next {
                match gap(store, signer, origin, &mut runs, next).await? {
                    Ok(p) => {
                        if let Some(c) = store.checkpoint_at_or_before(p.last_seq).await?
                            && c.seq == p.last_seq
                        {
                            report.checkpoints += 1;
                            if let Some(f) = checkpoint_ok(signer, origin, &c).await? {
                                return Ok(Some(f));
                            }
                            if c.head_hash != p.last_hash {
                                return Ok(Some(Failure {
                                    problem: Problem::CheckpointMismatch,
                                    seq: c.seq,
                                    detail: format!(
                                        "the prune record ending at {} differs from the signed checkpoint there",
                                        c.seq
                                    ),
                                }));
                            }
                        }
                        *prev = p.last_hash;
                        next = p.last_seq + 1;
                        jumped = true;
                    }
                    Err(f) => return Ok(Some(f)),
                }
            }
            if r.seq < next {
                return Ok(Some(Failure {
                    problem: Problem::Inserted,
                    seq: r.seq,
                    detail: format!(
                        "record {} lies at a position that retention removed",
                        r.row.id
                    ),
                }));
            }
            if jumped {
                // Checkpoints inside the removed run are not read again; the ones after
                // it are fetched afresh (at most one per position of this page).
                checkpoints = store.checkpoints(next, page_end, PAGE).await?.into_iter();
                cp = checkpoints.next();
            }
            let hash = match next_hash(prev, r.seq, &r.row) {
                Ok(h) => h,
                Err(e) => {
                    return Ok(Some(Failure {
                        problem: Problem::Modified,
                        seq: r.seq,
                        detail: format!("record {} cannot be read back: {e}", r.row.id),
                    }));
                }
            };
            if hash.as_slice() != r.hash.as_slice() {
                return Ok(Some(Failure {
                    problem: Problem::Modified,
                    seq: r.seq,
                    detail: format!("record {} does not hash to its stored value", r.row.id),
                }));
            }
            *prev = hash;
            report.records += 1;
            report.to_seq = r.seq;
            while let Some(c) = cp.take_if(|c| c.seq <= r.seq) {
                report.checkpoints += 1;
                if let Some(f) = checkpoint_ok(signer, origin, &c).await? {
                    return Ok(Some(f));
                }
                if c.seq == r.seq && c.head_hash != *prev {
                    return Ok(Some(Failure {
                        problem: Problem::CheckpointMismatch,
                        seq: c.seq,
                        detail: format!(
                            "the chain at {} differs from its signed checkpoint: rewritten at or before it",
                            c.seq
                        ),
                    }));
                }
                cp = checkpoints.next();
            }
            next += 1;
        }
        // Checkpoints past the last page are re-read with the next page. Fewer than
        // PAGE checkpoints per PAGE records always holds (at most one per record).
    }
    Ok(None)
}

/// The prune record that starts at `seq`, if its run's signature verifies (each run is
/// checked once per verification); otherwise the failure to report.
async fn gap(
    store: &dyn ChainStore,
    signer: &dyn CheckpointSigner,
    origin: &str,
    verified: &mut HashSet<i64>,
    seq: u64,
) -> Result<Result<Prune, Failure>, VerifyError> {
    let Some((prune, run_id)) = store.prune_at(seq).await? else {
        return Ok(Err(missing(seq)));
    };
    let forged = || Failure {
        problem: Problem::BadSignature,
        seq,
        detail: format!(
            "positions {}..={} were removed, but their prune record is not signed by this installation",
            prune.first_seq, prune.last_seq
        ),
    };
    if !verified.contains(&run_id) {
        let Some(run) = store.prune_run(run_id).await? else {
            return Ok(Err(forged()));
        };
        if run.origin != origin
            || !signer
                .verify(&run.key_name, run.statement().as_bytes(), &run.signature)
                .await?
        {
            return Ok(Err(forged()));
        }
        verified.insert(run_id);
    }
    Ok(Ok(prune))
}

fn missing(seq: u64) -> Failure {
    Failure {
        problem: Problem::Missing,
        seq,
        detail: format!("no record at {seq} although the chain goes on"),
    }
}

/// Signs the head when it moved since the newest checkpoint, after verifying what was
/// added since that checkpoint: a chain that does not verify is never signed. Returns the
/// new checkpoint, if any.
pub async fn checkpoint_now(
    store: &dyn ChainStore,
    signer: &dyn CheckpointSigner,
    origin: &str,
    now_us: i64,
) -> Result<Result<Option<Checkpoint>, Failure>, VerifyError> {
    let head = store.head().await?;
    let latest = store.checkpoint_at_or_before(u64::MAX >> 1).await?;
    if head.seq == 0 || latest.as_ref().is_some_and(|c| c.seq >= head.seq) {
        return Ok(Ok(None));
    }
    let from = latest.as_ref().map_or(1, |c| c.seq + 1);
    let report = verify(store, signer, origin, from, head.seq).await?;
    if let Some(f) = report.failure {
        return Ok(Err(f));
    }
    let note = checkpoint_note(origin, report.to_seq, &report.hash, now_us);
    let (key_name, key_version, signature) = signer.sign(note.as_bytes()).await?;
    let cp = Checkpoint {
        seq: report.to_seq,
        head_hash: report.hash,
        time_us: now_us,
        origin: origin.to_owned(),
        key_name,
        key_version,
        signature,
    };
    store.add_checkpoint(&cp).await?;
    Ok(Ok(Some(cp)))
}

/// A signer over a local Ed25519 key, for tests (production signs in crypto-svc).
#[cfg(test)]
pub mod local {
    use super::*;
    use std::sync::Arc;

    use async_trait::async_trait;
    use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
    use base64::Engine as _;

    pub struct LocalSigner {
        key: Ed25519KeyPair,
    }

    impl LocalSigner {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Arc<Self> {
            Arc::new(Self {
                key: Ed25519KeyPair::generate().unwrap(),
            })
        }
    }

    #[async_trait]
    impl CheckpointSigner for LocalSigner {
        async fn sign(
            &self,
            message: &[u8],
        ) -> Result<(String, u32, String), crate::chain::SignError> {
            let sig = self.key.sign(message);
            Ok((
                "local".into(),
                1,
                format!(
                    "sec:v1:{}",
                    base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
                ),
            ))
        }

        async fn verify(
            &self,
            _key: &str,
            message: &[u8],
            signature: &str,
        ) -> Result<bool, crate::chain::SignError> {
            let Some(b64) = signature.strip_prefix("sec:v1:") else {
                return Ok(false);
            };
            let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                return Ok(false);
            };
            Ok(
                UnparsedPublicKey::new(&ED25519, self.key.public_key().as_ref())
                    .verify(message, &sig)
                    .is_ok(),
            )
        }
    }
}

//! The in-memory replica of the revocations in force, which ValidateToken checks with
//! no round trip. Fed by this replica's own revocations at once and by the store (the
//! same rows ListRevocations serves) every `token.revocation_poll_seconds`, so another
//! replica's revocation is applied here within that interval.

use std::collections::{HashMap, HashSet};
use std::sync::{PoisonError, RwLock};

use chrono::{DateTime, Utc};

use crate::store::{RevocationKind, RevocationRow};

#[derive(Debug, Default)]
struct Inner {
    /// jti → until when the entry is kept (the token's exp plus skew).
    jti: HashMap<String, DateTime<Utc>>,
    /// subject / client → (not_before cut-off, entry expiry).
    subjects: HashMap<String, (DateTime<Utc>, DateTime<Utc>)>,
    clients: HashMap<String, (DateTime<Utc>, DateTime<Utc>)>,
    kids: HashSet<String>,
    synced_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
pub struct RevocationView(RwLock<Inner>);

fn later(
    m: &mut HashMap<String, (DateTime<Utc>, DateTime<Utc>)>,
    k: &str,
    nbf: DateTime<Utc>,
    exp: DateTime<Utc>,
) {
    let e = m.entry(k.to_owned()).or_insert((nbf, exp));
    e.0 = e.0.max(nbf);
    e.1 = e.1.max(exp);
}

impl RevocationView {
    pub fn apply(&self, r: &RevocationRow) {
        let mut i = self.0.write().unwrap_or_else(PoisonError::into_inner);
        match r.kind {
            RevocationKind::Jti => {
                let e = i.jti.entry(r.target.clone()).or_insert(r.expires_at);
                *e = (*e).max(r.expires_at);
            }
            RevocationKind::Subject => later(
                &mut i.subjects,
                &r.target,
                r.not_before.unwrap_or(r.created_at),
                r.expires_at,
            ),
            RevocationKind::Client => later(
                &mut i.clients,
                &r.target,
                r.not_before.unwrap_or(r.created_at),
                r.expires_at,
            ),
            RevocationKind::SigningKey => {
                i.kids.insert(r.target.clone());
            }
        }
    }

    pub(crate) fn set_revoked_kids(&self, kids: impl Iterator<Item = String>) {
        let mut i = self.0.write().unwrap_or_else(PoisonError::into_inner);
        i.kids.extend(kids);
    }

    pub fn prune(&self, now: DateTime<Utc>) {
        let mut i = self.0.write().unwrap_or_else(PoisonError::into_inner);
        i.jti.retain(|_, exp| *exp > now);
        i.subjects.retain(|_, (_, exp)| *exp > now);
        i.clients.retain(|_, (_, exp)| *exp > now);
    }

    pub(crate) fn synced_at(&self) -> Option<DateTime<Utc>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .synced_at
    }

    pub(crate) fn set_synced(&self, now: DateTime<Utc>) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .synced_at = Some(now);
    }

    /// Whether a token with these claims is revoked: its jti is denylisted, or it was
    /// issued at or before its subject's or client's cut-off, or its key is revoked.
    pub fn is_revoked(&self, jti: &str, sub: &str, client: &str, iat: i64, kid: &str) -> bool {
        let i = self.0.read().unwrap_or_else(PoisonError::into_inner);
        (!jti.is_empty() && i.jti.contains_key(jti))
            || i.subjects
                .get(sub)
                .is_some_and(|(nbf, _)| iat <= nbf.timestamp())
            || (!client.is_empty()
                && i.clients
                    .get(client)
                    .is_some_and(|(nbf, _)| iat <= nbf.timestamp()))
            || i.kids.contains(kid)
    }
}

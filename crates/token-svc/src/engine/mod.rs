//! token-svc's logic, without gRPC: the signing-key lifecycle, issuing, refresh
//! families, revocation, validation and statistics.

mod metrics;
mod revocations;
mod stats;
#[cfg(test)]
mod tests;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sec_common::clock::SharedClock;
use sec_common::error::{Error, ErrorCode};
use sec_common::events::{SecurityEvent, Severity, new_event};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::config::{RESERVED_CLAIMS, TokenConfig};
use crate::keys::{self, Alg, Signer};
use crate::store::{
    KeyRow, KeyState, RefreshRow, RevocationKind, RevocationRow, StoreError, TokenStore,
};

pub use metrics::TokenMetrics;
pub use revocations::RevocationView;
pub use stats::{ClientCounts, StatsReport};
pub use validate::{Reason, Validated};

pub type Emit = Arc<dyn Fn(SecurityEvent) + Send + Sync>;

/// Seals private keys at rest. In production: `sec_common::envelope::Envelope` under
/// the crypto-svc key `svc.token.signing-keys`, usable by token-svc only.
#[async_trait]
pub trait Sealer: Send + Sync + 'static {
    async fn seal(&self, plaintext: &[u8], aad: &[u8]) -> anyhow::Result<Vec<u8>>;
    async fn open(&self, sealed: &[u8], aad: &[u8]) -> anyhow::Result<Zeroizing<Vec<u8>>>;
}

#[async_trait]
impl Sealer for sec_common::envelope::Envelope {
    async fn seal(&self, plaintext: &[u8], aad: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(sec_common::envelope::Envelope::seal(self, plaintext, aad).await?)
    }
    async fn open(&self, sealed: &[u8], aad: &[u8]) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        Ok(sec_common::envelope::Envelope::open(self, sealed, aad).await?)
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Api(#[from] Error),
    /// RFC 6749 `invalid_grant`: unknown, expired, revoked, other client, scope widening.
    #[error("invalid refresh token")]
    InvalidGrant,
    /// The token was already rotated outside the grace window: its family is revoked.
    #[error("refresh token reuse detected; the token family is revoked")]
    ReuseDetected,
}

fn db(e: StoreError) -> TokenError {
    TokenError::Api(match e {
        StoreError::Db(e) => Error::unavailable("token store", &e),
        e => Error::internal("token store", &e),
    })
}

fn invalid(field: &str, msg: &'static str) -> TokenError {
    TokenError::Api(Error::invalid(field, msg))
}

/// The authenticated grant tokens are issued for (stored with a refresh family).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Grant {
    pub subject: String,
    pub client_id: String,
    pub scope: String,
    pub audience: Vec<String>,
    pub auth_time: i64,
    pub acr: String,
    pub amr: Vec<String>,
    pub session_id: String,
    pub extra_claims: Map<String, Value>,
}

#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    pub grant: Grant,
    pub access_ttl_seconds: u32,
    pub id_token: bool,
    pub nonce: String,
    pub authorization_code: String,
    pub id_claims: Map<String, Value>,
    pub id_ttl_seconds: u32,
    pub refresh_token: bool,
    pub refresh_ttl_seconds: u32,
}

#[derive(Debug, Clone, Default)]
pub struct RefreshRequest {
    pub refresh_token: String,
    pub client_id: String,
    pub scope: String,
    pub access_ttl_seconds: u32,
    pub id_token: bool,
    pub id_claims: Map<String, Value>,
}

#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub jti: String,
    pub kid: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct IssuedRefresh {
    pub token: String,
    pub family_id: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct IssueResult {
    pub access: Issued,
    pub id: Option<Issued>,
    pub refresh: Option<IssuedRefresh>,
    pub scope: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    Rotated,
    GraceReissued,
}

/// What RevokeToken targets.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    Jti(String),
    RefreshToken(String),
    Family(String),
    Subject(String),
    Client(String),
    Token(String),
}

/// A signing key as listed (no private part).
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub kid: String,
    pub alg: Alg,
    pub state: KeyState,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub unpublish_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub public_jwk: String,
    pub public_key: Vec<u8>,
}

impl KeyInfo {
    fn of(row: &KeyRow) -> Option<Self> {
        Some(Self {
            kid: row.kid.clone(),
            alg: Alg::parse(&row.alg)?,
            state: row.state,
            created_at: row.created_at,
            activated_at: row.activated_at,
            deactivated_at: row.deactivated_at,
            unpublish_at: row.unpublish_at,
            revoked_at: row.revoked_at,
            public_jwk: row.public_jwk.clone(),
            public_key: row.public_key.clone(),
        })
    }
}

/// The keys as last loaded from the store.
struct Ring {
    /// The same keys for the shared verification core, each bound to its algorithm.
    keyset: sec_common::jwt::KeySet,
    current: Option<(Arc<KeyInfo>, Arc<Signer>)>,
    jwks_json: String,
}

/// Signing-key cache: unsealed private keys live only here, in memory.
pub struct Engine {
    store: Arc<dyn TokenStore>,
    sealer: Arc<dyn Sealer>,
    clock: SharedClock,
    emit: Emit,
    cfg: TokenConfig,
    default_alg: Alg,
    metrics: TokenMetrics,
    ring: RwLock<Arc<Ring>>,
    signers: Mutex<HashMap<String, Arc<Signer>>>,
    /// When the ring was last reloaded because of an unknown kid (rate limit).
    last_kid_reload: Mutex<Option<DateTime<Utc>>>,
    revocations: RevocationView,
    stats: stats::Stats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Longest refresh token / JWT / other strings accepted from callers.
const MAX_ID_LEN: usize = 255;
const MAX_SCOPE_LEN: usize = 4096;
const MAX_JSON_LEN: usize = 8192;
const MAX_LIST: usize = 16;
const REFRESH_PREFIX: &str = "sec_rt_";
const MAX_REFRESH_LEN: usize = 128;

fn key_aad(kid: &str, alg: Alg) -> Vec<u8> {
    format!("sec-token:signing-key:v1:{kid}:{}", alg.as_str()).into_bytes()
}

fn sha256(s: &str) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes())
        .as_ref()
        .to_vec()
}

fn secs(n: u64) -> Duration {
    Duration::seconds(i64::try_from(n).unwrap_or(i64::MAX / 1000))
}

fn check_len(field: &str, v: &str, max: usize) -> Result<(), TokenError> {
    if v.len() > max {
        return Err(TokenError::Api(Error::invalid(
            field,
            format!("longer than {max} bytes"),
        )));
    }
    Ok(())
}

/// Parses a caller's JSON object (size-checked first).
pub fn json_object(field: &str, s: &str) -> Result<Map<String, Value>, TokenError> {
    if s.is_empty() {
        return Ok(Map::new());
    }
    check_len(field, s, MAX_JSON_LEN)?;
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(invalid(field, "must be a JSON object")),
    }
}

impl Engine {
    /// An engine over `store`; call [`Engine::start`] before serving.
    pub fn new(
        store: Arc<dyn TokenStore>,
        sealer: Arc<dyn Sealer>,
        clock: SharedClock,
        emit: Emit,
        cfg: TokenConfig,
        metrics: TokenMetrics,
    ) -> anyhow::Result<Self> {
        let default_alg = Alg::parse(&cfg.algorithm)
            .ok_or_else(|| anyhow::anyhow!("token.algorithm is not supported"))?;
        metrics.bind(clock.clone(), cfg.rotation_period_seconds);
        Ok(Self {
            store,
            sealer,
            clock,
            emit,
            default_alg,
            metrics,
            ring: RwLock::new(Arc::new(Ring {
                keyset: sec_common::jwt::KeySet::new(),
                current: None,
                jwks_json: "{\"keys\":[]}".into(),
            })),
            signers: Mutex::new(HashMap::new()),
            last_kid_reload: Mutex::new(None),
            revocations: RevocationView::default(),
            stats: stats::Stats::default(),
            cfg,
        })
    }

    pub fn config(&self) -> &TokenConfig {
        &self.cfg
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Start-up: keys exist (current + next, made if missing), the ring is loaded and
    /// revocations still in force are back in memory.
    pub async fn start(&self) -> Result<(), TokenError> {
        self.maintain_keys().await?;
        self.sync_revocations().await?;
        Ok(())
    }

    fn event(&self, ty: &str, subject: &str) -> SecurityEvent {
        let mut e = new_event(self.clock.as_ref(), "token", ty);
        e.subject = subject.to_owned();
        e
    }

    fn ring(&self) -> Arc<Ring> {
        self.ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    // ---------------------------------------------------------------- signing keys

    async fn new_key_row(&self, alg: Alg, state: KeyState) -> Result<KeyRow, TokenError> {
        let now = self.clock.now();
        let kid = self.clock.new_uuid_v7().simple().to_string();
        let g = keys::generate(alg, &kid)
            .map_err(|e| TokenError::Api(Error::internal("key generation", &e)))?;
        let sealed = self
            .sealer
            .seal(&g.pkcs8, &key_aad(&kid, alg))
            .await
            .map_err(|e| TokenError::Api(Error::unavailable("sealing a signing key", &e)))?;
        Ok(KeyRow {
            kid,
            alg: alg.as_str().to_owned(),
            state,
            created_at: now,
            activated_at: (state == KeyState::Current).then_some(now),
            deactivated_at: None,
            unpublish_at: None,
            revoked_at: None,
            public_key: g.public_key,
            public_jwk: g.jwk.to_string(),
            sealed_private: sealed,
        })
    }

    fn key_event(&self, ty: &str, kid: &str, alg: &str) {
        let mut e = self.event(ty, kid);
        e.details.insert("kid".into(), kid.into());
        e.details.insert("alg".into(), alg.into());
        if ty.ends_with("revoked") {
            e.severity = Severity::High as i32;
        }
        (self.emit)(e);
    }

    /// Brings the key set to its invariant (a current and a next key), rotates when
    /// the period is over, retires keys whose tokens have all expired, and reloads the
    /// ring. Every change is a compare-and-set: a replica that loses re-reads.
    /// Returns the kids that became current.
    pub async fn maintain_keys(&self) -> Result<Vec<String>, TokenError> {
        let mut activated = Vec::new();
        for _ in 0..5 {
            let now = self.clock.now();
            let rows = self.store.keys().await.map_err(db)?;
            let current = rows.iter().find(|k| k.state == KeyState::Current);
            let next = rows.iter().find(|k| k.state == KeyState::Next);
            let changed = match (current, next) {
                (None, None) => {
                    let row = self
                        .new_key_row(self.default_alg, KeyState::Current)
                        .await?;
                    self.insert_new_key(&row).await?
                }
                (Some(_), None) => {
                    let row = self.new_key_row(self.default_alg, KeyState::Next).await?;
                    self.insert_new_key(&row).await?
                }
                (None, Some(n)) => {
                    let (kid, alg) = (n.kid.clone(), n.alg.clone());
                    let won = self.promote(&kid, None, self.default_alg).await?;
                    if won {
                        activated.push(kid.clone());
                        self.key_event("sec.token.key.activated", &kid, &alg);
                    }
                    won
                }
                (Some(c), Some(n)) => {
                    let due = c.activated_at.unwrap_or(c.created_at)
                        + secs(self.cfg.rotation_period_seconds)
                        <= now;
                    let published_long_enough =
                        n.created_at + secs(self.cfg.publish_ahead_seconds) <= now;
                    if due && published_long_enough {
                        let (nk, ck, alg) = (n.kid.clone(), c.kid.clone(), n.alg.clone());
                        let won = self.promote(&nk, Some(&ck), self.default_alg).await?;
                        if won {
                            activated.push(nk.clone());
                            self.key_event("sec.token.key.activated", &nk, &alg);
                        }
                        won
                    } else {
                        false
                    }
                }
            };
            if changed {
                continue;
            }
            for k in rows.iter().filter(|k| k.state == KeyState::Retiring) {
                if k.unpublish_at.is_some_and(|t| t <= now)
                    && self.store.retire_key(&k.kid).await.map_err(db)?
                {
                    self.key_event("sec.token.key.retired", &k.kid, &k.alg);
                }
            }
            self.reload_ring().await?;
            return Ok(activated);
        }
        // Another replica kept changing the keys under us; its result is as good.
        self.reload_ring().await?;
        Ok(activated)
    }

    async fn insert_new_key(&self, row: &KeyRow) -> Result<bool, TokenError> {
        match self.store.insert_key(row).await {
            Ok(()) => {
                self.key_event("sec.token.key.created", &row.kid, &row.alg);
                if row.state == KeyState::Current {
                    self.key_event("sec.token.key.activated", &row.kid, &row.alg);
                }
                Ok(true)
            }
            // Another replica filled the slot first: re-read.
            Err(StoreError::Conflict) => Ok(true),
            Err(e) => Err(db(e)),
        }
    }

    async fn promote(
        &self,
        next_kid: &str,
        current_kid: Option<&str>,
        new_alg: Alg,
    ) -> Result<bool, TokenError> {
        let now = self.clock.now();
        let new_next = self.new_key_row(new_alg, KeyState::Next).await?;
        let unpublish_at = now + secs(self.cfg.retire_after_seconds());
        let won = self
            .store
            .promote(next_kid, current_kid, &new_next, now, unpublish_at)
            .await
            .map_err(db)?;
        if won {
            self.metrics.rotations.inc();
            self.stats.record(now, None, |c| c.rotations += 1);
            self.key_event("sec.token.key.created", &new_next.kid, &new_next.alg);
            if let Some(c) = current_kid {
                let mut e = self.event("sec.token.key.retiring", c);
                e.details.insert("kid".into(), c.into());
                (self.emit)(e);
            }
        }
        Ok(won)
    }

    /// Reloads the keys from the store: another replica's rotation is seen here.
    pub async fn reload_ring(&self) -> Result<(), TokenError> {
        let rows = self.store.keys().await.map_err(db)?;
        let mut keyset = sec_common::jwt::KeySet::new();
        let mut current = None;
        let mut jwks = Vec::new();
        for row in &rows {
            let Some(info) = KeyInfo::of(row) else {
                tracing::error!(kid = %row.kid, "signing key with an unknown algorithm ignored");
                continue;
            };
            let info = Arc::new(info);
            if row.state.published()
                && let Ok(v) = serde_json::from_str::<Value>(&row.public_jwk)
            {
                jwks.push(v);
            }
            let vk = match serde_json::from_str::<Value>(&row.public_jwk) {
                Ok(Value::Object(m)) => sec_common::jwt::VerifyingKey::from_jwk(&m).ok(),
                _ => None,
            };
            match vk {
                Some(vk) => {
                    use sec_common::jwt::KeyState as S;
                    let state = match row.state {
                        KeyState::Retired => S::Retired,
                        KeyState::Revoked => S::Revoked,
                        _ => S::Active,
                    };
                    keyset.insert(&row.kid, vk, state);
                }
                None => tracing::error!(kid = %row.kid, "stored public key does not parse"),
            }
            if row.state == KeyState::Current {
                let signer = self.signer_for(row, info.alg).await?;
                current = Some((info.clone(), signer));
            }
        }
        let jwks_json = serde_json::json!({ "keys": jwks }).to_string();
        {
            let mut signers = self.signers.lock().unwrap_or_else(PoisonError::into_inner);
            // Private keys of keys that no longer sign are dropped (aws-lc wipes them).
            signers.retain(|kid, _| current.as_ref().is_some_and(|(c, _)| &c.kid == kid));
        }
        self.metrics.set_signing_key_activated(
            current
                .as_ref()
                .map(|(k, _)| k.activated_at.unwrap_or(k.created_at)),
        );
        self.revocations.set_revoked_kids(
            rows.iter()
                .filter(|r| r.state == KeyState::Revoked)
                .map(|r| r.kid.clone()),
        );
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Ring {
            keyset,
            current,
            jwks_json,
        });
        Ok(())
    }

    async fn signer_for(&self, row: &KeyRow, alg: Alg) -> Result<Arc<Signer>, TokenError> {
        if let Some(s) = self
            .signers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&row.kid)
        {
            return Ok(s.clone());
        }
        let pkcs8 = self
            .sealer
            .open(&row.sealed_private, &key_aad(&row.kid, alg))
            .await
            .map_err(|e| TokenError::Api(Error::unavailable("unsealing the signing key", &e)))?;
        let signer = Arc::new(
            Signer::load(alg, &pkcs8)
                .map_err(|e| TokenError::Api(Error::internal("loading the signing key", &e)))?,
        );
        self.signers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(row.kid.clone(), signer.clone());
        Ok(signer)
    }

    pub fn jwks(&self) -> (String, u64) {
        (self.ring().jwks_json.clone(), self.cfg.jwks_max_age_seconds)
    }

    pub async fn list_keys(&self, include_inactive: bool) -> Result<Vec<KeyInfo>, TokenError> {
        let rows = self.store.keys().await.map_err(db)?;
        Ok(rows
            .iter()
            .filter(|r| include_inactive || r.state.published())
            .filter_map(KeyInfo::of)
            .collect())
    }

    /// RotateSigningKey: next → current now, a new next (of `alg`, or the configured one).
    pub async fn rotate_now(&self, alg: Option<Alg>) -> Result<Vec<KeyInfo>, TokenError> {
        for _ in 0..5 {
            let rows = self.store.keys().await.map_err(db)?;
            let current = rows.iter().find(|k| k.state == KeyState::Current);
            let Some(next) = rows.iter().find(|k| k.state == KeyState::Next) else {
                self.maintain_keys().await?;
                continue;
            };
            let (nk, nalg) = (next.kid.clone(), next.alg.clone());
            let ck = current.map(|c| c.kid.clone());
            if self
                .promote(&nk, ck.as_deref(), alg.unwrap_or(self.default_alg))
                .await?
            {
                self.key_event("sec.token.key.activated", &nk, &nalg);
                self.reload_ring().await?;
                return self.list_keys(false).await;
            }
        }
        Err(TokenError::Api(Error::new(
            ErrorCode::Aborted,
            "signing keys changed concurrently; retry",
        )))
    }

    /// RevokeSigningKey: unpublished at once, its tokens invalid; a revoked current or
    /// next key is replaced immediately.
    pub async fn revoke_key(&self, kid: &str, reason: &str) -> Result<KeyInfo, TokenError> {
        check_len("kid", kid, 64)?;
        check_len("reason", reason, 512)?;
        let now = self.clock.now();
        if self.store.revoke_key(kid, now).await.map_err(db)?.is_none() {
            return Err(TokenError::Api(Error::not_found(
                "no such signing key, or already revoked",
            )));
        }
        let row = RevocationRow {
            id: self.clock.new_uuid_v7().to_string(),
            kind: RevocationKind::SigningKey,
            target: kid.to_owned(),
            expires_at: now + secs(self.cfg.retire_after_seconds()),
            not_before: None,
            created_at: now,
        };
        self.store.insert_revocation(&row).await.map_err(db)?;
        self.signers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(kid);
        self.revocations.apply(&row);
        let mut e = self.revocation_event(&row);
        e.details
            .insert("reason_given".into(), (!reason.is_empty()).to_string());
        (self.emit)(e);
        self.key_event("sec.token.key.revoked", kid, "");
        self.maintain_keys().await?;
        self.list_keys(true)
            .await?
            .into_iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| TokenError::Api(Error::not_found("no such signing key")))
    }

    // ---------------------------------------------------------------- issuing

    fn check_grant(&self, g: &Grant) -> Result<(), TokenError> {
        if g.subject.is_empty() {
            return Err(invalid("grant.subject", "required"));
        }
        if g.client_id.is_empty() {
            return Err(invalid("grant.client_id", "required"));
        }
        check_len("grant.subject", &g.subject, MAX_ID_LEN)?;
        check_len("grant.client_id", &g.client_id, MAX_ID_LEN)?;
        check_len("grant.scope", &g.scope, MAX_SCOPE_LEN)?;
        check_len("grant.acr", &g.acr, MAX_ID_LEN)?;
        check_len("grant.session_id", &g.session_id, MAX_ID_LEN)?;
        if g.audience.len() > MAX_LIST || g.amr.len() > MAX_LIST {
            return Err(invalid("grant", "at most 16 audiences and 16 amr values"));
        }
        for a in g.audience.iter().chain(&g.amr) {
            if a.is_empty() || a.len() > MAX_ID_LEN {
                return Err(invalid(
                    "grant",
                    "audience and amr values must be 1..=255 bytes",
                ));
            }
        }
        for k in g.extra_claims.keys() {
            if !self.cfg.extra_claims.iter().any(|c| c == k) {
                return Err(invalid(
                    "grant.extra_claims_json",
                    "a claim is not in token.extra_claims",
                ));
            }
        }
        Ok(())
    }

    fn ttl(field: &str, asked: u32, default: u64, max: u64) -> Result<u64, TokenError> {
        match u64::from(asked) {
            0 => Ok(default),
            n if n > max => Err(TokenError::Api(Error::invalid(
                field,
                format!("at most {max} seconds"),
            ))),
            n => Ok(n),
        }
    }

    fn current_signer(&self) -> Result<(Arc<KeyInfo>, Arc<Signer>), TokenError> {
        let ring = self.ring();
        match &ring.current {
            Some(c) => Ok(c.clone()),
            None => {
                let mut e = self.event("sec.token.issue.failed", "");
                e.outcome = sec_common::events::Outcome::Failure as i32;
                e.details.insert("reason".into(), "no_current_key".into());
                (self.emit)(e);
                Err(TokenError::Api(Error::new(
                    ErrorCode::Unavailable,
                    "no signing key is current",
                )))
            }
        }
    }

    fn sign(
        &self,
        signer: &Signer,
        kid: &str,
        typ: &str,
        claims: &Value,
    ) -> Result<String, TokenError> {
        let header = serde_json::json!({ "alg": signer.alg.as_str(), "typ": typ, "kid": kid });
        signer.jws(&header, claims).map_err(|e| {
            let mut ev = self.event("sec.token.issue.failed", "");
            ev.outcome = sec_common::events::Outcome::Failure as i32;
            ev.details.insert("reason".into(), "signing_failed".into());
            (self.emit)(ev);
            TokenError::Api(Error::internal("signing a token", &e))
        })
    }

    fn access_claims(&self, g: &Grant, now: DateTime<Utc>, exp: DateTime<Utc>, jti: &str) -> Value {
        let mut c = Map::new();
        // Extra claims first: the reserved ones below always win (and are refused on input).
        for (k, v) in &g.extra_claims {
            c.insert(k.clone(), v.clone());
        }
        c.insert("iss".into(), self.cfg.issuer.clone().into());
        c.insert("sub".into(), g.subject.clone().into());
        let aud: Vec<String> = if g.audience.is_empty() {
            vec![self.cfg.default_audience.clone()]
        } else {
            g.audience.clone()
        };
        c.insert(
            "aud".into(),
            if aud.len() == 1 {
                aud[0].clone().into()
            } else {
                aud.into()
            },
        );
        c.insert("exp".into(), exp.timestamp().into());
        c.insert("iat".into(), now.timestamp().into());
        c.insert("nbf".into(), now.timestamp().into());
        c.insert("jti".into(), jti.into());
        c.insert("client_id".into(), g.client_id.clone().into());
        c.insert("scope".into(), g.scope.clone().into());
        if g.auth_time > 0 {
            c.insert("auth_time".into(), g.auth_time.into());
        }
        if !g.acr.is_empty() {
            c.insert("acr".into(), g.acr.clone().into());
        }
        if !g.amr.is_empty() {
            c.insert("amr".into(), g.amr.clone().into());
        }
        Value::Object(c)
    }

    /// Signs the access (and ID) tokens of a grant. Nothing is stored. `id`: the ID
    /// token's lifetime, nonce, authorization code and extra claims, when one is wanted.
    fn sign_tokens(
        &self,
        g: &Grant,
        access_ttl: u64,
        id: Option<(u64, &str, &str, &Map<String, Value>)>,
    ) -> Result<(Issued, Option<Issued>), TokenError> {
        let (key, signer) = self.current_signer()?;
        let now = self.clock.now();
        let exp = now + secs(access_ttl);
        let jti = self.clock.new_uuid_v7().to_string();
        let claims = self.access_claims(g, now, exp, &jti);
        let token = self.sign(&signer, &key.kid, "at+jwt", &claims)?;
        let id_token = match id {
            None => None,
            Some((ttl, nonce, code, extra)) => {
                let exp = now + secs(ttl);
                let ijti = self.clock.new_uuid_v7().to_string();
                let mut c = Map::new();
                for (k, v) in extra {
                    c.insert(k.clone(), v.clone());
                }
                c.insert("iss".into(), self.cfg.issuer.clone().into());
                c.insert("sub".into(), g.subject.clone().into());
                c.insert("aud".into(), g.client_id.clone().into());
                c.insert("azp".into(), g.client_id.clone().into());
                c.insert("exp".into(), exp.timestamp().into());
                c.insert("iat".into(), now.timestamp().into());
                c.insert("jti".into(), ijti.clone().into());
                if g.auth_time > 0 {
                    c.insert("auth_time".into(), g.auth_time.into());
                }
                if !nonce.is_empty() {
                    c.insert("nonce".into(), nonce.into());
                }
                if !g.acr.is_empty() {
                    c.insert("acr".into(), g.acr.clone().into());
                }
                if !g.amr.is_empty() {
                    c.insert("amr".into(), g.amr.clone().into());
                }
                if !g.session_id.is_empty() {
                    c.insert("sid".into(), g.session_id.clone().into());
                }
                c.insert("at_hash".into(), signer.alg.half_hash(&token).into());
                if !code.is_empty() {
                    c.insert("c_hash".into(), signer.alg.half_hash(code).into());
                }
                let t = self.sign(&signer, &key.kid, "JWT", &Value::Object(c))?;
                self.metrics.issued("id");
                Some(Issued {
                    token: t,
                    jti: ijti,
                    kid: key.kid.clone(),
                    expires_at: exp,
                })
            }
        };
        self.metrics.issued("access");
        Ok((
            Issued {
                token,
                jti,
                kid: key.kid.clone(),
                expires_at: exp,
            },
            id_token,
        ))
    }

    fn check_id_claims(m: &Map<String, Value>) -> Result<(), TokenError> {
        if m.keys().any(|k| RESERVED_CLAIMS.contains(&k.as_str())) {
            return Err(invalid("id_claims_json", "may not set a reserved claim"));
        }
        Ok(())
    }

    pub async fn issue(&self, req: IssueRequest) -> Result<IssueResult, TokenError> {
        self.check_grant(&req.grant)?;
        check_len("nonce", &req.nonce, 512)?;
        check_len("authorization_code", &req.authorization_code, 2048)?;
        Self::check_id_claims(&req.id_claims)?;
        let access_ttl = Self::ttl(
            "access_ttl_seconds",
            req.access_ttl_seconds,
            self.cfg.access_ttl_seconds,
            self.cfg.max_access_ttl_seconds,
        )?;
        let id_ttl = Self::ttl(
            "id_ttl_seconds",
            req.id_ttl_seconds,
            self.cfg.id_ttl_seconds,
            self.cfg.max_id_ttl_seconds,
        )?;
        let refresh_ttl = Self::ttl(
            "refresh_ttl_seconds",
            req.refresh_ttl_seconds,
            self.cfg.refresh_ttl_seconds,
            self.cfg.max_refresh_ttl_seconds,
        )?;
        let id = req.id_token.then_some((
            id_ttl,
            req.nonce.as_str(),
            req.authorization_code.as_str(),
            &req.id_claims,
        ));
        let (access, id_token) = self.sign_tokens(&req.grant, access_ttl, id)?;
        let refresh = if req.refresh_token {
            let now = self.clock.now();
            let family_id = self.clock.new_uuid_v7().to_string();
            let (row, token) =
                self.refresh_row(&req.grant, &family_id, None, now, now + secs(refresh_ttl))?;
            self.store.insert_refresh(&row).await.map_err(db)?;
            self.metrics.issued("refresh");
            Some(IssuedRefresh {
                token,
                family_id,
                expires_at: row.expires_at,
            })
        } else {
            None
        };
        self.stats
            .record_issue(self.clock.now(), &req.grant.client_id);
        Ok(IssueResult {
            access,
            id: id_token,
            refresh,
            scope: req.grant.scope,
        })
    }

    fn refresh_row(
        &self,
        g: &Grant,
        family_id: &str,
        parent: Option<&str>,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(RefreshRow, String), TokenError> {
        let token = sec_common::secret::generate_secret(REFRESH_PREFIX)
            .map_err(|e| TokenError::Api(Error::internal("random generator", &e)))?;
        let grant_json = serde_json::to_string(g)
            .map_err(|e| TokenError::Api(Error::internal("encoding a grant", &e)))?;
        Ok((
            RefreshRow {
                id: self.clock.new_uuid_v7().to_string(),
                token_hash: sha256(&token),
                family_id: family_id.to_owned(),
                parent_id: parent.map(str::to_owned),
                user_id: g.subject.clone(),
                client_id: g.client_id.clone(),
                scope: g.scope.clone(),
                grant_json,
                created_at: now,
                expires_at,
                rotated_at: None,
                successor_id: None,
                is_revoked: false,
            },
            token,
        ))
    }

    async fn find_refresh(&self, token: &str) -> Result<Option<RefreshRow>, TokenError> {
        if !token.starts_with(REFRESH_PREFIX) || token.len() > MAX_REFRESH_LEN {
            return Ok(None);
        }
        self.store.refresh_by_hash(&sha256(token)).await.map_err(db)
    }

    /// Rotates a refresh token and issues fresh tokens (see the crate README for the
    /// grace window and reuse detection).
    pub async fn refresh(
        &self,
        req: RefreshRequest,
    ) -> Result<(IssueResult, RefreshOutcome), TokenError> {
        check_len("client_id", &req.client_id, MAX_ID_LEN)?;
        check_len("scope", &req.scope, MAX_SCOPE_LEN)?;
        Self::check_id_claims(&req.id_claims)?;
        let access_ttl = Self::ttl(
            "access_ttl_seconds",
            req.access_ttl_seconds,
            self.cfg.access_ttl_seconds,
            self.cfg.max_access_ttl_seconds,
        )?;
        // The successor a grace reissue failed to replace: seen again on the re-read, it
        // was not replaced by a concurrent reissue but used (or revoked), so this
        // presentation is reuse.
        let mut stuck_successor: Option<String> = None;
        for _ in 0..4 {
            let Some(row) = self.find_refresh(&req.refresh_token).await? else {
                return Err(TokenError::InvalidGrant);
            };
            if stuck_successor.is_some() && row.successor_id == stuck_successor {
                return Err(self.reuse(&row).await);
            }
            let now = self.clock.now();
            if row.is_revoked || row.expires_at <= now || row.client_id != req.client_id {
                return Err(TokenError::InvalidGrant);
            }
            let mut grant: Grant = serde_json::from_str(&row.grant_json)
                .map_err(|e| TokenError::Api(Error::internal("stored grant", &e)))?;
            if !req.scope.is_empty() {
                let granted: Vec<&str> = row.scope.split_whitespace().collect();
                if req.scope.split_whitespace().any(|s| !granted.contains(&s)) {
                    return Err(TokenError::InvalidGrant);
                }
            }
            let (outcome, new_token) = match (row.rotated_at, &row.successor_id) {
                (None, _) => {
                    let (succ, token) = self.refresh_row(
                        &grant,
                        &row.family_id,
                        Some(&row.id),
                        now,
                        row.expires_at,
                    )?;
                    if !self
                        .store
                        .rotate_refresh(&row.id, now, &succ)
                        .await
                        .map_err(db)?
                    {
                        continue; // another use won: re-read and judge again
                    }
                    (RefreshOutcome::Rotated, token)
                }
                (Some(rotated_at), Some(successor))
                    if now < rotated_at + secs(self.cfg.refresh_grace_seconds) =>
                {
                    let (succ, token) = self.refresh_row(
                        &grant,
                        &row.family_id,
                        Some(&row.id),
                        now,
                        row.expires_at,
                    )?;
                    if !self
                        .store
                        .regrace_refresh(&row.id, successor, &succ)
                        .await
                        .map_err(db)?
                    {
                        // The successor was used, or replaced concurrently: re-read.
                        stuck_successor = Some(successor.clone());
                        continue;
                    }
                    (RefreshOutcome::GraceReissued, token)
                }
                _ => return Err(self.reuse(&row).await),
            };
            if !req.scope.is_empty() {
                grant.scope = req.scope.split_whitespace().collect::<Vec<_>>().join(" ");
            }
            let id = req
                .id_token
                .then_some((self.cfg.id_ttl_seconds, "", "", &req.id_claims));
            let (access, id_token) = self.sign_tokens(&grant, access_ttl, id)?;
            self.metrics.issued("refresh");
            self.stats
                .record(now, Some(&grant.client_id), |c| c.refreshed += 1);
            return Ok((
                IssueResult {
                    access,
                    id: id_token,
                    refresh: Some(IssuedRefresh {
                        token: new_token,
                        family_id: row.family_id.clone(),
                        expires_at: row.expires_at,
                    }),
                    scope: grant.scope,
                },
                outcome,
            ));
        }
        Err(TokenError::Api(Error::new(
            ErrorCode::Aborted,
            "refresh token used concurrently; retry",
        )))
    }

    async fn reuse(&self, row: &RefreshRow) -> TokenError {
        match self.store.revoke_family(&row.family_id).await {
            Ok(_) => {}
            Err(e) => return db(e),
        }
        let now = self.clock.now();
        self.stats
            .record(now, Some(&row.client_id), |c| c.reuse_detected += 1);
        let mut e = self.event("sec.token.refresh.reuse_detected", &row.user_id);
        e.severity = Severity::High as i32;
        e.outcome = sec_common::events::Outcome::Failure as i32;
        e.details.insert("family_id".into(), row.family_id.clone());
        e.details.insert("client_id".into(), row.client_id.clone());
        (self.emit)(e);
        TokenError::ReuseDetected
    }

    pub async fn introspect_refresh(
        &self,
        token: &str,
    ) -> Result<Option<(RefreshRow, bool)>, TokenError> {
        let Some(row) = self.find_refresh(token).await? else {
            return Ok(None);
        };
        let active =
            !row.is_revoked && row.rotated_at.is_none() && row.expires_at > self.clock.now();
        Ok(Some((row, active)))
    }

    // ---------------------------------------------------------------- revocation

    fn revocation_event(&self, row: &RevocationRow) -> SecurityEvent {
        let subject = match row.kind {
            RevocationKind::Subject | RevocationKind::Client => row.target.as_str(),
            _ => "",
        };
        let mut e = self.event("sec.token.revoked", subject);
        e.details.insert("kind".into(), row.kind.as_str().into());
        e.details.insert(
            "jti".into(),
            if row.kind == RevocationKind::Jti {
                row.target.clone()
            } else {
                String::new()
            },
        );
        e.details
            .insert("expires_at".into(), row.expires_at.timestamp().to_string());
        e.details.insert(
            "not_before".into(),
            row.not_before
                .map(|t| t.timestamp().to_string())
                .unwrap_or_default(),
        );
        e.details.insert(
            "kid".into(),
            if row.kind == RevocationKind::SigningKey {
                row.target.clone()
            } else {
                String::new()
            },
        );
        e
    }

    async fn record_revocation(
        &self,
        kind: RevocationKind,
        target: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), TokenError> {
        let now = self.clock.now();
        let row = RevocationRow {
            id: self.clock.new_uuid_v7().to_string(),
            kind,
            target: target.to_owned(),
            expires_at,
            not_before: matches!(kind, RevocationKind::Subject | RevocationKind::Client)
                .then_some(now),
            created_at: now,
        };
        self.store.insert_revocation(&row).await.map_err(db)?;
        self.revocations.apply(&row);
        (self.emit)(self.revocation_event(&row));
        Ok(())
    }

    /// RevokeToken. `requesting_client`: the token / family must be that client's, or
    /// nothing happens (RFC 7009).
    pub async fn revoke(
        &self,
        target: RevokeTarget,
        expires_at: Option<DateTime<Utc>>,
        requesting_client: &str,
    ) -> Result<u64, TokenError> {
        check_len("requesting_client_id", requesting_client, MAX_ID_LEN)?;
        let now = self.clock.now();
        let longest = now + secs(self.cfg.retire_after_seconds());
        let n = match target {
            RevokeTarget::Jti(jti) => {
                if jti.is_empty() {
                    return Err(invalid("jti", "required"));
                }
                check_len("jti", &jti, MAX_ID_LEN)?;
                let exp = expires_at.unwrap_or(longest).min(longest);
                if exp <= now {
                    return Ok(0);
                }
                self.record_revocation(
                    RevocationKind::Jti,
                    &jti,
                    exp + secs(self.cfg.skew_seconds),
                )
                .await?;
                1
            }
            RevokeTarget::Token(token) => {
                let v = match self.validate(&token, validate::Kind::Any, None).await {
                    Ok(v) => v,
                    // An invalid token needs no revocation (RFC 7009 §2.2: still success).
                    Err(_) => return Ok(0),
                };
                if !requesting_client.is_empty() && v.client_id != requesting_client {
                    return Ok(0);
                }
                self.record_revocation(
                    RevocationKind::Jti,
                    &v.jti,
                    v.expires_at + secs(self.cfg.skew_seconds),
                )
                .await?;
                1
            }
            RevokeTarget::RefreshToken(t) => match self.find_refresh(&t).await? {
                Some(row) if requesting_client.is_empty() || row.client_id == requesting_client => {
                    self.store.revoke_family(&row.family_id).await.map_err(db)?
                }
                _ => 0,
            },
            RevokeTarget::Family(f) => {
                check_len("family_id", &f, MAX_ID_LEN)?;
                if !requesting_client.is_empty() {
                    return Err(invalid(
                        "requesting_client_id",
                        "revoke a family by its refresh token when acting for a client",
                    ));
                }
                self.store.revoke_family(&f).await.map_err(db)?
            }
            RevokeTarget::Subject(s) | RevokeTarget::Client(s) if s.is_empty() => {
                return Err(invalid("target", "required"));
            }
            RevokeTarget::Subject(s) => {
                check_len("subject", &s, MAX_ID_LEN)?;
                self.record_revocation(RevocationKind::Subject, &s, longest)
                    .await?;
                self.store
                    .revoke_refresh_of(RevocationKind::Subject, &s)
                    .await
                    .map_err(db)?
                    + 1
            }
            RevokeTarget::Client(c) => {
                check_len("client_id", &c, MAX_ID_LEN)?;
                self.record_revocation(RevocationKind::Client, &c, longest)
                    .await?;
                self.store
                    .revoke_refresh_of(RevocationKind::Client, &c)
                    .await
                    .map_err(db)?
                    + 1
            }
        };
        if n > 0 {
            self.stats.record(now, None, |c| c.revoked += n);
        }
        Ok(n)
    }

    /// Applies revocations other replicas wrote since the last sync (overlapping, so a
    /// late commit is not missed; applying one twice is harmless).
    pub async fn sync_revocations(&self) -> Result<(), TokenError> {
        let now = self.clock.now();
        let since = self
            .revocations
            .synced_at()
            .map(|t| t - Duration::seconds(30));
        let rows = self.store.revocations(since, now).await.map_err(db)?;
        for r in &rows {
            self.revocations.apply(r);
        }
        self.revocations.prune(now);
        self.revocations.set_synced(now);
        Ok(())
    }

    /// ListRevocations: a snapshot, or what changed since `cursor`.
    pub async fn list_revocations(
        &self,
        cursor: &str,
    ) -> Result<(Vec<RevocationRow>, String, bool, DateTime<Utc>), TokenError> {
        let now = self.clock.now();
        let since = if cursor.is_empty() {
            None
        } else {
            let t = cursor
                .strip_prefix("v1.")
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(|| invalid("cursor", "not a cursor this service returned"))?;
            // Too old: the caller gets a snapshot instead.
            (t > now - Duration::days(1)).then(|| t - Duration::seconds(30))
        };
        let rows = self.store.revocations(since, now).await.map_err(db)?;
        Ok((
            rows,
            format!("v1.{}", now.timestamp_micros()),
            since.is_none(),
            now,
        ))
    }

    // ---------------------------------------------------------------- maintenance

    /// Deletes expired refresh tokens and revocations; refreshes the family gauge.
    pub async fn cleanup(&self) -> Result<u64, TokenError> {
        let now = self.clock.now();
        let n = self.store.cleanup(now).await.map_err(db)?;
        let families = self.store.active_families(now).await.map_err(db)?;
        self.metrics.set_active_families(families);
        Ok(n)
    }

    pub async fn stats(
        &self,
        window_seconds: u32,
        client_id: &str,
    ) -> Result<StatsReport, TokenError> {
        let window = match window_seconds {
            0 => 3600,
            n if n > 86_400 => return Err(invalid("window_seconds", "at most 86400")),
            n => i64::from(n),
        };
        check_len("client_id", client_id, MAX_ID_LEN)?;
        let now = self.clock.now();
        let families = self.store.active_families(now).await.map_err(db)?;
        self.metrics.set_active_families(families);
        let mut r = self.stats.report(now, window, client_id);
        r.active_refresh_families = families;
        Ok(r)
    }
}

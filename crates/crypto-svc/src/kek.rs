//! The root of trust: the key-encryption key (KEK) that wraps every key version at rest.
//!
//! Wrapping is AES-256-GCM with a random nonce and the key name and version as
//! associated data, so a wrapped blob cannot be moved to another key or version. Each
//! blob records the id of the KEK that wrapped it; the ring holds the current KEK and any
//! previous ones, so a KEK rotation needs no downtime: new material is wrapped by the
//! current KEK at once, old material is still readable, and `RotateKek` re-wraps it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use sec_common::config::{Config, Secret};

use crate::config::CryptoConfig;
use zeroize::Zeroizing;

use crate::store::KeyStore;

const KEK_LEN: usize = 32;
/// File the embedded default keeps its generated KEK in (inside the data directory).
pub const GENERATED_KEK_FILE: &str = "crypto-kek";

struct Kek {
    id: String,
    key: LessSafeKey,
    /// HMAC key derived from the KEK for key-record MACs.
    mac: aws_lc_rs::hmac::Key,
}

/// The current KEK and the previous ones.
pub struct KekRing {
    current: Kek,
    previous: Vec<Kek>,
    /// The KEK file this load generated (embedded default, first start), if any.
    generated: Option<PathBuf>,
}

impl std::fmt::Debug for KekRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekRing")
            .field("current", &self.current.id)
            .field("previous", &self.previous.len())
            .field("generated", &self.generated)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KekError {
    #[error("key material is wrapped by KEK {0}, which is not configured")]
    UnknownKek(String),
    #[error("wrapped key material failed authentication")]
    Corrupt,
}

/// Associated data of material wrapped before the key type was bound (still readable).
fn aad_v1(name: &str, version: u32) -> Vec<u8> {
    format!("sec-crypto-kek:v1:{name}:{version}").into_bytes()
}

/// Associated data of current wrappings: the key type is bound too, so material cannot be
/// reinterpreted as another type (an AES key as an HMAC or ChaCha key) by editing a row.
fn aad_v2(key_type: &str, name: &str, version: u32) -> Vec<u8> {
    format!("sec-crypto-kek:v2:{key_type}:{name}:{version}").into_bytes()
}

/// Leading bytes of a v2 wrapping (`prefix ‖ nonce ‖ ciphertext ‖ tag`). v1 wrappings are
/// `nonce ‖ ciphertext ‖ tag` and are told apart by this prefix; stripping or adding it
/// changes the nonce, so a wrapping cannot be downgraded to v1.
pub const WRAP_V2_PREFIX: &[u8; 4] = b"SKW2";

/// Label of the key, derived from each KEK, that MACs key records.
const RECORD_MAC_LABEL: &[u8] = b"sec-crypto-record-mac:v1";

/// What checking a record MAC found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacCheck {
    /// Valid under the current KEK.
    Current,
    /// Valid under a previous KEK: re-MAC it (`RotateKek` does).
    Previous,
    /// Wrong tag, malformed, or made by a KEK this ring does not hold.
    Invalid,
}

impl Kek {
    fn new(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(bytes.len() == KEK_LEN, "a KEK must be {KEK_LEN} bytes");
        // The id names the KEK without revealing it: HMAC of a fixed label under the KEK.
        let tag = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes),
            b"sec-crypto-kek-id",
        );
        let id = tag.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| anyhow::anyhow!("invalid KEK"))?,
        );
        // A separate key for record MACs (HMAC of a fixed label under the KEK), so the
        // KEK itself is only ever used for one purpose per primitive.
        let derived = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes),
            RECORD_MAC_LABEL,
        );
        let mac = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, derived.as_ref());
        Ok(Self { id, key, mac })
    }
}

/// Decodes a KEK given as base64 text (whitespace ignored) or as 32 raw bytes.
fn decode(raw: &[u8]) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let text: String = String::from_utf8_lossy(raw)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&text)
        && bytes.len() == KEK_LEN
    {
        return Ok(Zeroizing::new(bytes));
    }
    if raw.len() == KEK_LEN {
        return Ok(Zeroizing::new(raw.to_vec()));
    }
    anyhow::bail!("a KEK must be base64 of {KEK_LEN} bytes (or {KEK_LEN} raw bytes)")
}

fn from_secret(s: &Secret, what: &str) -> anyhow::Result<Kek> {
    Kek::new(&decode(s.expose().as_bytes()).with_context(|| what.to_owned())?)
}

fn from_file(path: &Path) -> anyhow::Result<Kek> {
    let raw = Zeroizing::new(
        std::fs::read(path).with_context(|| format!("reading KEK file {}", path.display()))?,
    );
    Kek::new(&decode(&raw).with_context(|| format!("KEK file {}", path.display()))?)
}

impl KekRing {
    /// From `crypto.kek` / `crypto.kek_file` (+ previous ones). With neither configured
    /// and embedded storage, a KEK is generated once in the data directory (see
    /// [`KekRing::generated_file`]); with a real database and no KEK the service refuses
    /// to start.
    pub fn load(cfg: &Config) -> anyhow::Result<Self> {
        let c = cfg.section::<CryptoConfig>(crate::NAME)?;
        let mut generated = None;
        let current = match (&c.kek, &c.kek_file) {
            (Some(s), _) => from_secret(s, "crypto.kek")?,
            (None, Some(p)) => from_file(p)?,
            (None, None) if cfg.storage.database_url.is_none() => {
                let (kek, fresh) = Self::generated(&cfg.data_dir)?;
                generated = fresh;
                kek
            }
            (None, None) => anyhow::bail!(
                "no KEK configured: set crypto.kek (SEC_CRYPTO__KEK) or crypto.kek_file; a KEK is generated only for the embedded default"
            ),
        };
        let mut previous = Vec::new();
        for (i, s) in c.previous_keks.iter().enumerate() {
            previous.push(from_secret(s, &format!("crypto.previous_keks[{i}]"))?);
        }
        for p in &c.previous_kek_files {
            previous.push(from_file(p)?);
        }
        previous.retain(|k| k.id != current.id);
        Ok(Self {
            current,
            previous,
            generated,
        })
    }

    /// Every KEK setting parses and every configured file is readable, without generating
    /// anything: run before any port is bound.
    pub fn check_config(cfg: &Config) -> anyhow::Result<()> {
        let c = cfg.section::<CryptoConfig>(crate::NAME)?;
        match (&c.kek, &c.kek_file) {
            (Some(s), _) => drop(from_secret(s, "crypto.kek")?),
            (None, Some(p)) => drop(from_file(p)?),
            (None, None) if cfg.storage.database_url.is_none() => {
                let generated = cfg.data_dir.join(GENERATED_KEK_FILE);
                if generated.exists() {
                    drop(from_file(&generated)?);
                }
            }
            (None, None) => anyhow::bail!(
                "no KEK configured: set crypto.kek (SEC_CRYPTO__KEK) or crypto.kek_file; a KEK is generated only for the embedded default"
            ),
        }
        for (i, s) in c.previous_keks.iter().enumerate() {
            from_secret(s, &format!("crypto.previous_keks[{i}]"))?;
        }
        for p in &c.previous_kek_files {
            from_file(p)?;
        }
        Ok(())
    }

    /// The data directory's KEK, created if absent; with the path if this call created
    /// it. Created with the never-overwrite primitive: if two processes start at once,
    /// exactly one KEK is generated and both use it.
    fn generated(data_dir: &Path) -> anyhow::Result<(Kek, Option<PathBuf>)> {
        let path = data_dir.join(GENERATED_KEK_FILE);
        let mut created = false;
        if !path.exists() {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating data directory {}", data_dir.display()))?;
            let mut bytes = Zeroizing::new([0_u8; KEK_LEN]);
            aws_lc_rs::rand::fill(bytes.as_mut())
                .map_err(|_| anyhow::anyhow!("random generator failed"))?;
            let text =
                Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()));
            created = sec_common::fsutil::create_secret_exclusive(&path, text.as_bytes())?;
            if created {
                tracing::warn!(path = %path.display(), "generated a kek for the embedded default; production must supply crypto.kek or crypto.kek_file");
            }
        }
        Ok((from_file(&path)?, created.then_some(path)))
    }

    /// The KEK file generated by this load, if the embedded default had none yet. A
    /// generated KEK can only be right for an empty key store: see [`KekRing::check_store`].
    pub fn generated_file(&self) -> Option<&Path> {
        self.generated.as_deref()
    }

    /// Whether `kek_id` is the current or a previous KEK of this ring.
    pub fn knows(&self, kek_id: &str) -> bool {
        self.current.id == kek_id || self.previous.iter().any(|k| k.id == kek_id)
    }

    /// Refuses to serve a key store holding material wrapped by a KEK this ring lacks.
    ///
    /// Without this, a lost KEK file on the embedded default was silently replaced by a
    /// fresh KEK at start, and every stored key became unreadable one request at a time;
    /// a wrongly configured KEK failed the same way. Checking at start turns both into
    /// one clear error. A KEK generated by this very start is deleted before failing, so
    /// the next start does not adopt it either: the fix is to restore the original file.
    pub async fn check_store(&self, store: &dyn KeyStore) -> anyhow::Result<()> {
        let usage = store
            .kek_usage()
            .await
            .context("checking which KEKs wrap the stored keys")?;
        let unknown: Vec<(String, u64)> = usage
            .into_iter()
            .filter(|(id, _)| !self.knows(id))
            .collect();
        let Some((first, _)) = unknown.first() else {
            return Ok(());
        };
        let versions: u64 = unknown.iter().map(|(_, n)| n).sum();
        let ids = unknown
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let cause = KekError::UnknownKek(first.clone());
        match &self.generated {
            Some(path) => {
                let removed = match std::fs::remove_file(path) {
                    Ok(()) => "it has been removed again".to_owned(),
                    Err(e) => format!("removing it failed ({e}): delete it by hand"),
                };
                anyhow::bail!(
                    "{cause}: the KEK file {} was missing although the database holds {versions} key version(s) wrapped by KEK(s) {ids}; restore the original {GENERATED_KEK_FILE} file from backup into the data directory (or configure that KEK as crypto.kek / crypto.kek_file). A new KEK was generated at this start and {removed}, so it is never adopted",
                    path.display()
                )
            }
            None => anyhow::bail!(
                "{cause}: the database holds {versions} key version(s) wrapped by KEK(s) {ids}, none of which is configured (current KEK is {}); configure the right crypto.kek / crypto.kek_file, and list KEKs still in use after a KEK rotation under crypto.previous_keks / crypto.previous_kek_files",
                self.current.id
            ),
        }
    }

    /// A ring from raw KEKs (tests).
    pub fn from_bytes(current: &[u8], previous: &[&[u8]]) -> anyhow::Result<Self> {
        Ok(Self {
            current: Kek::new(current)?,
            previous: previous
                .iter()
                .map(|p| Kek::new(p))
                .collect::<Result<_, _>>()?,
            generated: None,
        })
    }

    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Wraps key material of type `key_type` for `name` version `version` under the
    /// current KEK, in the v2 format (type, name and version bound).
    pub fn wrap(
        &self,
        key_type: &str,
        name: &str,
        version: u32,
        material: &[u8],
    ) -> anyhow::Result<(String, Vec<u8>)> {
        let mut nonce = [0_u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("random generator failed"))?;
        let mut buf = material.to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad_v2(key_type, name, version)),
                &mut buf,
            )
            .map_err(|_| anyhow::anyhow!("wrapping failed"))?;
        let mut out = Vec::with_capacity(WRAP_V2_PREFIX.len() + NONCE_LEN + buf.len());
        out.extend_from_slice(WRAP_V2_PREFIX);
        out.extend_from_slice(&nonce);
        out.append(&mut buf);
        Ok((self.current.id.clone(), out))
    }

    /// Whether `wrapped` is in the current (v2) format; v1 wrappings are re-wrapped by
    /// `RotateKek`.
    pub fn is_current_format(wrapped: &[u8]) -> bool {
        wrapped.starts_with(WRAP_V2_PREFIX)
    }

    /// Unwraps material wrapped by KEK `kek_id` for `name` version `version` of type
    /// `key_type`: v2 wrappings must match all three, v1 wrappings name and version.
    pub fn unwrap(
        &self,
        kek_id: &str,
        key_type: &str,
        name: &str,
        version: u32,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KekError> {
        let kek = self
            .find(kek_id)
            .ok_or_else(|| KekError::UnknownKek(kek_id.to_owned()))?;
        if let Some(v2) = wrapped.strip_prefix(WRAP_V2_PREFIX.as_slice())
            && let Ok(m) = open(kek, v2, &aad_v2(key_type, name, version))
        {
            return Ok(m);
        }
        // A v1 wrapping (whose random nonce may, rarely, start with the v2 prefix).
        open(kek, wrapped, &aad_v1(name, version))
    }

    fn find(&self, kek_id: &str) -> Option<&Kek> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == kek_id)
    }

    /// The MAC of a key record's canonical encoding under the current KEK, as stored:
    /// `<kek id>:<base64 tag>`.
    pub fn record_mac(&self, record: &[u8]) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.current.mac, record);
        format!(
            "{}:{}",
            self.current.id,
            base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
        )
    }

    /// Checks a stored record MAC (constant-time comparison).
    pub fn check_record_mac(&self, stored: &str, record: &[u8]) -> MacCheck {
        let Some((id, tag)) = stored.split_once(':') else {
            return MacCheck::Invalid;
        };
        let Some(kek) = self.find(id) else {
            return MacCheck::Invalid;
        };
        let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(tag) else {
            return MacCheck::Invalid;
        };
        if aws_lc_rs::hmac::verify(&kek.mac, record, &tag).is_err() {
            return MacCheck::Invalid;
        }
        if kek.id == self.current.id {
            MacCheck::Current
        } else {
            MacCheck::Previous
        }
    }

    /// A v1 wrapping, as written before the key type was bound (tests of the upgrade).
    #[doc(hidden)]
    pub fn wrap_v1_for_tests(
        &self,
        name: &str,
        version: u32,
        material: &[u8],
    ) -> anyhow::Result<(String, Vec<u8>)> {
        let mut nonce = [0_u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("random generator failed"))?;
        let mut buf = material.to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad_v1(name, version)),
                &mut buf,
            )
            .map_err(|_| anyhow::anyhow!("wrapping failed"))?;
        let mut out = nonce.to_vec();
        out.append(&mut buf);
        Ok((self.current.id.clone(), out))
    }
}

fn open(kek: &Kek, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KekError> {
    if wrapped.len() < NONCE_LEN {
        return Err(KekError::Corrupt);
    }
    let (nonce, body) = wrapped.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KekError::Corrupt)?;
    let mut buf = Zeroizing::new(body.to_vec());
    let len = kek
        .key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| KekError::Corrupt)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_binds_type_name_and_version_and_detects_tampering() {
        let ring = KekRing::from_bytes(&[7; 32], &[]).unwrap();
        let (id, blob) = ring
            .wrap("aes256-gcm", "orders", 3, b"secret material")
            .unwrap();
        assert!(KekRing::is_current_format(&blob));
        assert_eq!(
            ring.unwrap(&id, "aes256-gcm", "orders", 3, &blob)
                .unwrap()
                .as_slice(),
            b"secret material"
        );
        for (ty, name, v, what) in [
            ("aes256-gcm", "orders", 4, "other version"),
            ("aes256-gcm", "billing", 3, "other key"),
            ("hmac-sha256", "orders", 3, "other type"),
            ("chacha20-poly1305", "orders", 3, "other type"),
        ] {
            assert_eq!(
                ring.unwrap(&id, ty, name, v, &blob),
                Err(KekError::Corrupt),
                "{what}"
            );
        }
        let mut t = blob.clone();
        t[20] ^= 1;
        assert_eq!(
            ring.unwrap(&id, "aes256-gcm", "orders", 3, &t),
            Err(KekError::Corrupt),
            "tampered"
        );
        assert_eq!(
            ring.unwrap(&id, "aes256-gcm", "orders", 3, &blob[..5]),
            Err(KekError::Corrupt),
            "truncated"
        );
        assert_eq!(
            ring.unwrap(&id, "aes256-gcm", "orders", 3, &blob[4..]),
            Err(KekError::Corrupt),
            "no downgrade to v1 by stripping the prefix"
        );
        assert!(matches!(
            ring.unwrap("0000", "aes256-gcm", "orders", 3, &blob),
            Err(KekError::UnknownKek(_))
        ));
    }

    #[test]
    fn v1_wrappings_still_unwrap() {
        let ring = KekRing::from_bytes(&[7; 32], &[]).unwrap();
        let (id, blob) = ring
            .wrap_v1_for_tests("orders", 3, b"old material")
            .unwrap();
        assert!(!KekRing::is_current_format(&blob));
        assert_eq!(
            ring.unwrap(&id, "aes256-gcm", "orders", 3, &blob)
                .unwrap()
                .as_slice(),
            b"old material"
        );
        assert_eq!(
            ring.unwrap(&id, "aes256-gcm", "orders", 2, &blob),
            Err(KekError::Corrupt),
            "still bound to name and version"
        );
    }

    #[test]
    fn record_macs_verify_under_current_and_previous_keks_only() {
        let old = KekRing::from_bytes(&[1; 32], &[]).unwrap();
        let mac = old.record_mac(b"record");
        assert_eq!(old.check_record_mac(&mac, b"record"), MacCheck::Current);
        assert_eq!(old.check_record_mac(&mac, b"recorD"), MacCheck::Invalid);
        assert_eq!(
            old.check_record_mac("garbage", b"record"),
            MacCheck::Invalid
        );
        let ring = KekRing::from_bytes(&[2; 32], &[&[1; 32]]).unwrap();
        assert_eq!(ring.check_record_mac(&mac, b"record"), MacCheck::Previous);
        let other = KekRing::from_bytes(&[3; 32], &[]).unwrap();
        assert_eq!(other.check_record_mac(&mac, b"record"), MacCheck::Invalid);
        // a tag from another KEK under this KEK's id does not verify
        let forged = format!(
            "{}:{}",
            old.current_id(),
            other.record_mac(b"record").split_once(':').unwrap().1
        );
        assert_eq!(old.check_record_mac(&forged, b"record"), MacCheck::Invalid);
    }

    #[test]
    fn previous_keks_still_unwrap_and_ids_differ() {
        let old = KekRing::from_bytes(&[1; 32], &[]).unwrap();
        let (old_id, blob) = old.wrap("ed25519", "k", 1, b"m").unwrap();
        let ring = KekRing::from_bytes(&[2; 32], &[&[1; 32]]).unwrap();
        assert_ne!(ring.current_id(), old_id);
        assert_eq!(
            ring.unwrap(&old_id, "ed25519", "k", 1, &blob)
                .unwrap()
                .as_slice(),
            b"m"
        );
        let (new_id, _) = ring.wrap("ed25519", "k", 1, b"m").unwrap();
        assert_eq!(new_id, ring.current_id());
    }

    #[test]
    fn embedded_default_generates_once_and_production_requires_a_kek() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            data_dir: dir.path().into(),
            ..Default::default()
        };
        cfg.set_section(crate::NAME, CryptoConfig::default())
            .unwrap();
        let a = KekRing::load(&cfg).unwrap();
        let b = KekRing::load(&cfg).unwrap();
        assert_eq!(
            a.current_id(),
            b.current_id(),
            "second start reuses the generated KEK"
        );
        assert_eq!(
            a.generated_file(),
            Some(dir.path().join(GENERATED_KEK_FILE).as_path()),
            "the first start reports it generated the KEK"
        );
        assert_eq!(b.generated_file(), None, "the second start did not");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(GENERATED_KEK_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut prod = cfg.clone();
        prod.storage.database_url = Some(Secret::new("postgres://x@db/sec"));
        let err = KekRing::load(&prod).unwrap_err().to_string();
        assert!(err.contains("no KEK configured"), "{err}");
        let mut c = CryptoConfig {
            kek: Some(Secret::new(
                base64::engine::general_purpose::STANDARD.encode([9_u8; 32]),
            )),
            ..CryptoConfig::default()
        };
        prod.set_section(crate::NAME, c.clone()).unwrap();
        assert!(KekRing::load(&prod).is_ok());
        assert!(KekRing::check_config(&prod).is_ok());
        c.kek = Some(Secret::new("dG9vIHNob3J0"));
        prod.set_section(crate::NAME, c).unwrap();
        assert!(KekRing::check_config(&prod).is_err());
        let err = format!("{:#}", KekRing::load(&prod).unwrap_err());
        assert!(err.contains("crypto.kek") && !err.contains("dG9v"), "{err}");
    }

    /// What `run` does at start: load the ring, open the database, check the ring
    /// against the stored keys.
    async fn start(
        cfg: &Config,
    ) -> anyhow::Result<(
        KekRing,
        std::sync::Arc<dyn KeyStore>,
        sec_common::storage::Db,
    )> {
        let ring = KekRing::load(cfg)?;
        let db = sec_common::storage::connect_db(cfg, crate::NAME, &crate::MIGRATIONS).await?;
        let store = crate::key_store(&db);
        ring.check_store(store.as_ref()).await?;
        Ok((ring, store, db))
    }

    fn engine(ring: KekRing, store: std::sync::Arc<dyn KeyStore>) -> crate::engine::Engine {
        crate::engine::Engine::new(
            store,
            std::sync::Arc::new(ring),
            sec_common::clock::system(),
            std::sync::Arc::new(|_| {}),
            crate::engine::Limits {
                max_payload_bytes: 1024,
                cache_ttl: std::time::Duration::ZERO,
                ..crate::engine::Limits::default()
            },
            crate::engine::CryptoMetrics::unregistered(),
        )
    }

    #[tokio::test]
    async fn a_lost_kek_file_stops_the_start_instead_of_being_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            data_dir: dir.path().into(),
            ..Default::default()
        };
        cfg.set_section(crate::NAME, CryptoConfig::default())
            .unwrap();
        let kek_file = dir.path().join(GENERATED_KEK_FILE);

        // First start: KEK generated, a key created and used.
        let (ring, store, db) = start(&cfg).await.unwrap();
        let original_id = ring.current_id().to_owned();
        let e = engine(ring, store);
        e.create_key(
            &sec_common::auth::Caller::Admin,
            "orders",
            crate::material::KeyType::Aes256Gcm,
            crate::store::KeyPolicy::default(),
        )
        .await
        .unwrap();
        let (ct, _) = e.encrypt("orders", b"card 4242", b"").await.unwrap();
        drop(e);
        db.close().await;
        let original = std::fs::read(&kek_file).unwrap();

        // The KEK file is lost: every start fails, and leaves no new KEK behind.
        std::fs::remove_file(&kek_file).unwrap();
        for _ in 0..2 {
            let err = format!("{:#}", start(&cfg).await.err().unwrap());
            assert!(
                err.contains(&format!(
                    "wrapped by KEK {original_id}, which is not configured"
                )) && err.contains("was missing")
                    && err.contains("restore the original"),
                "{err}"
            );
            assert!(!kek_file.exists(), "the KEK generated just now was removed");
        }

        // Restoring the file from backup brings every key back.
        std::fs::write(&kek_file, &original).unwrap();
        let (ring, store, db) = start(&cfg).await.unwrap();
        assert_eq!(ring.current_id(), original_id);
        assert_eq!(ring.generated_file(), None);
        let e = engine(ring, store);
        let (pt, _) = e
            .decrypt(&sec_common::auth::Caller::Admin, "orders", &ct, b"")
            .await
            .unwrap();
        assert_eq!(pt.as_slice(), b"card 4242");
        db.close().await;

        // A wrong configured KEK is refused too, and the right one as a previous KEK works.
        let mut wrong = cfg.clone();
        let mut wrong_crypto = CryptoConfig {
            kek: Some(Secret::new(
                base64::engine::general_purpose::STANDARD.encode([9_u8; 32]),
            )),
            ..CryptoConfig::default()
        };
        wrong
            .set_section(crate::NAME, wrong_crypto.clone())
            .unwrap();
        let err = format!("{:#}", start(&wrong).await.err().unwrap());
        assert!(
            err.contains(&format!(
                "wrapped by KEK {original_id}, which is not configured"
            )) && err.contains("crypto.previous_keks"),
            "{err}"
        );
        assert!(kek_file.exists(), "a configured KEK never touches the file");
        wrong_crypto.previous_kek_files = vec![kek_file.clone()];
        wrong.set_section(crate::NAME, wrong_crypto).unwrap();
        let (_, _, db) = start(&wrong).await.unwrap();
        db.close().await;
    }
}

//! argon2id for human passwords, and only for them. Machine secrets (tokens, client
//! secrets) carry 256 random bits and use [`crate::auth::hash_token`] /
//! [`KeyedHasher`](crate::secret::KeyedHasher) instead.
//!
//! A verification costs tens of milliseconds of CPU: it runs on tokio's blocking pool,
//! never on an async worker, and a semaphore bounds how many run at once so a flood of
//! login attempts queues there instead of starving every other request.

use std::sync::Arc;

use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use tokio::sync::Semaphore;

use crate::error::{Error, ErrorCode};

/// Hashes and verifies passwords off the async workers, at most `concurrency` at once.
#[derive(Debug, Clone)]
pub struct PasswordHasher {
    slots: Arc<Semaphore>,
}

impl PasswordHasher {
    pub fn new(concurrency: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// argon2id PHC string of `password`.
    pub async fn hash(&self, password: &str) -> Result<String, Error> {
        let _permit = self.permit().await?;
        let password = zeroize::Zeroizing::new(password.to_owned());
        tokio::task::spawn_blocking(move || hash_blocking(&password))
            .await
            .map_err(|e| Error::internal("hashing a password", &e))?
            .map_err(|e| Error::internal("hashing a password", &*e))
    }

    /// Whether `password` matches `phc`. A malformed hash never matches.
    pub async fn verify(&self, password: &str, phc: &str) -> Result<bool, Error> {
        let _permit = self.permit().await?;
        let password = zeroize::Zeroizing::new(password.to_owned());
        let phc = phc.to_owned();
        tokio::task::spawn_blocking(move || verify_blocking(&password, &phc))
            .await
            .map_err(|e| Error::internal("checking a password", &e))
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        self.slots
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorCode::Unavailable, "shutting down"))
    }
}

/// argon2id of `password` on the calling thread (blocking contexts and tests only).
pub fn hash_blocking(password: &str) -> anyhow::Result<String> {
    let mut salt = [0_u8; 16];
    aws_lc_rs::rand::fill(&mut salt)
        .map_err(|_| anyhow::anyhow!("system random generator failed"))?;
    let hash = argon2::Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
    Ok(hash.to_string())
}

/// argon2id verification on the calling thread (blocking contexts only).
pub fn verify_blocking(password: &str, phc: &str) -> bool {
    argon2::Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_then_verify_and_refuse_wrong_or_malformed() {
        let h = PasswordHasher::new(2);
        let phc = h.hash("correct horse").await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(h.verify("correct horse", &phc).await.unwrap());
        assert!(!h.verify("wrong horse", &phc).await.unwrap());
        assert!(!h.verify("correct horse", "not-a-hash").await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_verifications_queue_and_all_answer() {
        let h = PasswordHasher::new(1);
        let phc = hash_blocking("pw").unwrap();
        let jobs: Vec<_> = (0..4)
            .map(|_| {
                let (h, phc) = (h.clone(), phc.clone());
                tokio::spawn(async move { h.verify("nope", &phc).await })
            })
            .collect();
        // While they queue on the semaphore, async tasks keep running.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { tx.send(()).ok() });
        rx.await.unwrap();
        for j in jobs {
            assert!(!j.await.unwrap().unwrap());
        }
    }
}

//! Webhook delivery: a signed POST, retried with exponential backoff and jitter from the
//! durable queue `alert_webhook_deliveries`, worked by a supervised task.
//!
//! Headers: `X-Sec-Delivery: <uuid>` (the same on every attempt: receivers de-duplicate
//! on it) and `X-Sec-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A receiver recomputes the HMAC over the raw body, compares it in constant time and
//! refuses a `t` too far from its clock ([`verify_signature`] is the reference).
//!
//! Outcomes: 2xx delivered; 4xx other than 408/429 failed for good; anything else
//! (408, 429, 5xx, 3xx — redirects are not followed — or no answer) is retried
//! `1 s × 2^(attempt-1)` (at most 5 min) later, with jitter, up to [`MAX_ATTEMPTS`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sec_common::clock::SharedClock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::WebhookConfig;
use super::engine::AlertMetrics;
use super::store::{AlertStore, Claimed, Finish};
use crate::store::StoreError;

pub const DELIVERY_HEADER: &str = "X-Sec-Delivery";
pub const SIGNATURE_HEADER: &str = "X-Sec-Signature";
/// Attempts before a delivery is given up.
pub const MAX_ATTEMPTS: u32 = 10;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// Deliveries attempted at once per tick.
const PER_TICK: u32 = 16;
/// How often the queue is polled when nothing wakes the worker.
const POLL: Duration = Duration::from_secs(1);
/// How often the worker also recounts open alerts for `sec_audit_alerts_open`, so a
/// replica's gauge follows acknowledgements made on other replicas.
const OPEN_GAUGE_EVERY: Duration = Duration::from_secs(15);
/// Shortest secret accepted.
const MIN_SECRET_BYTES: usize = 32;

/// A configured webhook, its secret loaded.
pub struct Webhook {
    pub name: String,
    pub url: url::Url,
    secret: Vec<u8>,
    pub timeout: Duration,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("secret", &"[redacted]")
            .finish()
    }
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read webhook secret file {}: {e}", path.display()))?;
    let trimmed = raw.trim_ascii().to_vec();
    anyhow::ensure!(
        trimmed.len() >= MIN_SECRET_BYTES,
        "webhook secret file {} holds fewer than {MIN_SECRET_BYTES} bytes",
        path.display()
    );
    Ok(trimmed)
}

impl Webhook {
    /// Validates the configuration and reads the secret: a missing or short secret
    /// stops the service from starting (fail closed).
    pub fn load(c: &WebhookConfig) -> anyhow::Result<Self> {
        let url = c
            .check()
            .map_err(|(k, m)| anyhow::anyhow!("audit.alerts.webhooks `{}`: {k} {m}", c.name))?;
        Ok(Self {
            name: c.name.clone(),
            url,
            secret: read_secret(&c.secret_file)?,
            timeout: Duration::from_secs(c.timeout_seconds),
        })
    }

    #[cfg(test)]
    pub fn for_test(name: &str, url: &str, secret: &[u8]) -> Self {
        Self {
            name: name.into(),
            url: url::Url::parse(url).unwrap_or_else(|e| panic!("{e}")),
            secret: secret.to_vec(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: i64, body: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", crate::chain::hex(tag.as_ref()))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a receiver does: parses the header, refuses a `t` more than `tolerance_seconds`
/// from `now`, and checks the HMAC in constant time.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_seconds: i64,
) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = unhex(v),
            _ => {}
        }
    }
    let (Some(t), Some(tag)) = (t, v1) else {
        return false;
    };
    if (now - t).abs() > tolerance_seconds {
        return false;
    }
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(body);
    aws_lc_rs::hmac::verify(&key, &msg, &tag).is_ok()
}

/// Delay before the attempt after `attempts` failed ones: `1 s × 2^(attempts-1)`, at
/// most 5 min, then scaled into `[½, 1]` of that by `jitter` (0.0..=1.0).
pub fn retry_delay(attempts: u32, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    let base = FIRST_RETRY.saturating_mul(1 << exp).min(MAX_RETRY);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

fn jitter() -> f64 {
    let mut b = [0_u8; 2];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 1.0;
    }
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}

/// An HTTP client on the platform's one TLS stack (rustls on aws-lc-rs), trusting the
/// system's roots, never following redirects.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // An unparsable system certificate is skipped, as every TLS client does.
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("sec-audit/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// What one attempt's answer means.
fn classify(status: reqwest::StatusCode) -> Result<(), (bool, String)> {
    let code = status.as_u16();
    if status.is_success() {
        Ok(())
    } else if status.is_client_error() && code != 408 && code != 429 {
        Err((false, format!("HTTP {code}")))
    } else {
        Err((true, format!("HTTP {code}")))
    }
}

/// The delivery worker.
pub struct Deliverer {
    hooks: HashMap<String, Webhook>,
    client: reqwest::Client,
    store: Arc<dyn AlertStore>,
    clock: SharedClock,
    metrics: AlertMetrics,
    wake: Arc<Notify>,
}

impl Deliverer {
    pub fn new(
        hooks: Vec<Webhook>,
        client: reqwest::Client,
        store: Arc<dyn AlertStore>,
        clock: SharedClock,
        metrics: AlertMetrics,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            hooks: hooks.into_iter().map(|h| (h.name.clone(), h)).collect(),
            client,
            store,
            clock,
            metrics,
            wake,
        }
    }

    fn lease(&self) -> Duration {
        self.hooks
            .values()
            .map(|h| h.timeout)
            .max()
            .unwrap_or(Duration::ZERO)
            + Duration::from_secs(30)
    }

    /// Attempts every delivery due now; returns how many were attempted.
    pub async fn tick(&self) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let lease_until = now + chrono::Duration::from_std(self.lease()).unwrap_or_default();
        let due = self
            .store
            .claim_due(
                now.timestamp_micros(),
                lease_until.timestamp_micros(),
                PER_TICK,
            )
            .await?;
        let n = due.len();
        let results = futures::future::join_all(due.iter().map(|c| self.attempt(c))).await;
        for (c, how) in due.iter().zip(results) {
            let at = self.clock.now().timestamp_micros();
            let outcome = match &how {
                Finish::Delivered => "delivered",
                Finish::Retry { .. } => "retry",
                Finish::Failed { .. } => "failed",
            };
            match self.store.finish(c, &how, at).await {
                Ok(true) => {
                    self.metrics.delivery(outcome);
                    match &how {
                        Finish::Delivered => {
                            tracing::info!(delivery = %c.id, alert_id = %c.alert_id, webhook = %c.webhook, "alert delivered");
                        }
                        Finish::Retry { error, .. } => {
                            tracing::warn!(delivery = %c.id, webhook = %c.webhook, attempts = c.attempts, error = %error, "alert delivery failed, will retry");
                        }
                        Finish::Failed { error } => {
                            tracing::error!(delivery = %c.id, alert_id = %c.alert_id, webhook = %c.webhook, attempts = c.attempts, error = %error, "alert delivery given up");
                        }
                    }
                }
                Ok(false) => {
                    tracing::warn!(delivery = %c.id, "delivery was taken over by another worker meanwhile")
                }
                Err(e) => {
                    // The lease runs out and the delivery is attempted again.
                    tracing::warn!(delivery = %c.id, error = %e, "cannot record the delivery's outcome");
                }
            }
        }
        Ok(n)
    }

    async fn attempt(&self, c: &Claimed) -> Finish {
        let Some(hook) = self.hooks.get(&c.webhook) else {
            return Finish::Failed {
                error: "webhook no longer configured".into(),
            };
        };
        let t = self.clock.now().timestamp();
        let sent = self
            .client
            .post(hook.url.clone())
            .timeout(hook.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(DELIVERY_HEADER, c.id.to_string())
            .header(SIGNATURE_HEADER, signature(&hook.secret, t, &c.body))
            .body(c.body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(resp) => match classify(resp.status()) {
                Ok(()) => return Finish::Delivered,
                Err(f) => f,
            },
            // No URL in the message: it is configuration, but keep errors short.
            Err(e) => (true, transport_error(&e)),
        };
        match failure {
            (true, error) if c.attempts < MAX_ATTEMPTS => {
                let delay = retry_delay(c.attempts, jitter());
                let next = self.clock.now()
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                Finish::Retry {
                    next_us: next.timestamp_micros(),
                    error,
                }
            }
            (true, error) => Finish::Failed {
                error: format!("{error}; gave up after {MAX_ATTEMPTS} attempts"),
            },
            (false, error) => Finish::Failed { error },
        }
    }

    /// The supervised loop: a tick when woken or every second, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut recounted: Option<tokio::time::Instant> = None;
        loop {
            if recounted.is_none_or(|t| t.elapsed() >= OPEN_GAUGE_EVERY) {
                recounted = Some(tokio::time::Instant::now());
                match self.store.open_count().await {
                    Ok(n) => self.metrics.set_open(n),
                    Err(e) => tracing::warn!(error = %e, "cannot count open alerts"),
                }
            }
            match self.tick().await {
                Ok(n) if n as u32 == PER_TICK => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the webhook queue"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        "request failed".into()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_does_not() {
        let secret = [7_u8; 32];
        let body = r#"{"a":1}"#;
        let h = signature(&secret, 1_800_000_000, body);
        assert!(h.starts_with("t=1800000000,v1="));
        assert!(verify_signature(
            &secret,
            &h,
            body.as_bytes(),
            1_800_000_100,
            300
        ));
        assert!(!verify_signature(
            &secret,
            &h,
            b"{\"a\":2}",
            1_800_000_100,
            300
        ));
        assert!(!verify_signature(
            &[8; 32],
            &h,
            body.as_bytes(),
            1_800_000_100,
            300
        ));
        assert!(
            !verify_signature(&secret, &h, body.as_bytes(), 1_800_001_000, 300),
            "stale"
        );
        assert!(!verify_signature(
            &secret,
            "t=1,v1=zz",
            body.as_bytes(),
            1,
            300
        ));
        assert!(!verify_signature(&secret, "", body.as_bytes(), 1, 300));
    }

    #[test]
    fn retry_schedule_doubles_to_five_minutes_with_jitter() {
        assert_eq!(retry_delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(2, 1.0), Duration::from_secs(2));
        assert_eq!(retry_delay(4, 1.0), Duration::from_secs(8));
        assert_eq!(retry_delay(9, 1.0), Duration::from_secs(256));
        assert_eq!(retry_delay(10, 1.0), Duration::from_secs(300));
        assert_eq!(retry_delay(40, 1.0), Duration::from_secs(300));
        assert_eq!(retry_delay(4, 0.0), Duration::from_secs(4));
        let j = retry_delay(4, jitter());
        assert!(j >= Duration::from_secs(4) && j <= Duration::from_secs(8));
    }

    #[test]
    fn status_classes() {
        use reqwest::StatusCode as S;
        assert!(classify(S::OK).is_ok());
        assert!(classify(S::NO_CONTENT).is_ok());
        assert!(matches!(classify(S::BAD_REQUEST), Err((false, _))));
        assert!(matches!(classify(S::GONE), Err((false, _))));
        assert!(matches!(classify(S::REQUEST_TIMEOUT), Err((true, _))));
        assert!(matches!(classify(S::TOO_MANY_REQUESTS), Err((true, _))));
        assert!(matches!(classify(S::SERVICE_UNAVAILABLE), Err((true, _))));
        assert!(matches!(classify(S::MOVED_PERMANENTLY), Err((true, _))));
    }
}

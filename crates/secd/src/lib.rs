//! The all-in-one launcher as a library: binds every service's listeners, runs every
//! service's `run` in one process on one [`Platform`], and shuts them down in order
//! (audit-svc last, so it stores the other services' stopped events). `secd` and the
//! test harness both start the platform through [`run_all`].

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use sec_common::config::Config;
use sec_common::service::{Listeners, Platform};
use sec_common::spec::ServiceSpec;
use tokio_util::sync::CancellationToken;

/// Every service of the platform, in start order (audit first, so it consumes from the
/// start). Adding a service: its crate, and one line here.
pub static SERVICES: &[&ServiceSpec] = &[
    &audit_svc::SPEC,
    &crypto_svc::SPEC,
    &token_svc::SPEC,
    &session_svc::SPEC,
    &auth_svc::SPEC,
    &gdpr_svc::SPEC,
    &assess_svc::SPEC,
];

/// The spec of a service by short name.
pub fn spec(name: &str) -> Option<&'static ServiceSpec> {
    SERVICES.iter().copied().find(|s| s.name == name)
}

/// Binds every configured address (before anything starts, so a taken port fails fast).
/// A port 0 is replaced in `config` by the port it got, so services in this process dial
/// each other where they really listen.
pub async fn bind_all(config: &mut Config) -> anyhow::Result<BTreeMap<&'static str, Listeners>> {
    let mut out = BTreeMap::new();
    for s in SERVICES {
        let addrs = config
            .services
            .get_mut(s.name)
            .with_context(|| format!("services.{} is not configured", s.name))?;
        let http = s.http_facade.then_some(config.facade.http_addr);
        let l = Listeners::bind(addrs, http)
            .await
            .with_context(|| format!("{}-svc", s.name))?;
        addrs.grpc_addr = l.grpc.local_addr()?;
        addrs.admin_addr = l.admin.local_addr()?;
        if let Some(h) = &l.http {
            config.facade.http_addr = h.local_addr()?;
        }
        out.insert(s.name, l);
    }
    Ok(out)
}

/// Port-0 listeners for every service; the config is updated to the bound addresses.
pub async fn bind_ephemeral(
    config: &mut Config,
) -> anyhow::Result<BTreeMap<&'static str, Listeners>> {
    let mut out = BTreeMap::new();
    for s in SERVICES {
        let l = Listeners::ephemeral(s.http_facade).await?;
        let addrs = config
            .services
            .entry(s.name.to_owned())
            .or_insert_with(|| sec_common::config::ServiceAddrs::local(0, 0));
        addrs.grpc_addr = l.grpc.local_addr()?;
        addrs.admin_addr = l.admin.local_addr()?;
        if let Some(h) = &l.http {
            config.facade.http_addr = h.local_addr()?;
        }
        out.insert(s.name, l);
    }
    Ok(out)
}

/// Runs every service until `shutdown`, then stops them: all but audit first, then
/// audit-svc once their events are on the bus. If one service fails, all are stopped
/// and the first error is returned.
pub async fn run_all(
    platform: Platform,
    mut listeners: BTreeMap<&'static str, Listeners>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let others_stop = CancellationToken::new();
    let audit_stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for s in SERVICES {
        let name = s.name;
        let l = listeners.remove(name).context("missing listeners")?;
        let token = if name == "audit" {
            audit_stop.clone()
        } else {
            others_stop.clone()
        };
        let fut = (s.run)(platform.clone(), l, token);
        tasks.push((name, tokio::spawn(fut)));
        if name == "audit" {
            // audit-svc subscribes before the others emit their started events
            tokio::task::yield_now().await;
        }
    }
    let (audit, others): (Vec<_>, Vec<_>) = tasks.into_iter().partition(|(n, _)| *n == "audit");

    // A service that ends before shutdown has failed: stop everything.
    let failed = CancellationToken::new();
    let mut watch = futures::stream::FuturesUnordered::new();
    for (name, handle) in others {
        let failed = failed.clone();
        watch.push(async move {
            let r = handle.await.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = &r {
                tracing::error!(service = name, error = %format!("{e:#}"), "service failed");
                failed.cancel();
            }
            r.with_context(|| format!("{name}-svc"))
        });
    }
    let drive = async {
        use futures::StreamExt as _;
        let mut first_err = None;
        while let Some(r) = watch.next().await {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err
    };
    tokio::pin!(drive);
    let first_err = tokio::select! {
        e = &mut drive => e,
        _ = shutdown.cancelled() => { others_stop.cancel(); drive.await }
        _ = failed.cancelled() => { others_stop.cancel(); drive.await }
    };
    others_stop.cancel();
    audit_stop.cancel();
    let mut result = match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    };
    for (_, handle) in audit {
        let r = handle
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .context("audit-svc");
        if result.is_ok() {
            result = r;
        }
    }
    let left = platform
        .events
        .flush(Duration::from_secs(
            platform.config.shutdown.grace_seconds.max(1),
        ))
        .await;
    if left > 0 {
        tracing::error!(
            pending = left,
            "security events not stored by the broker at exit"
        );
    }
    result
}

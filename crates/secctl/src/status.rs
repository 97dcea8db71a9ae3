//! `secctl status`: gRPC health of every service.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use sec_common::config::Config;
use sec_common::grpc::channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::output::{Output, print_json};
use crate::rpc::endpoint;

pub async fn status(config: &Config, output: Output) -> anyhow::Result<ExitCode> {
    let checks = secd::SERVICES.iter().map(|spec| async move {
        let name = spec.name;
        let url = endpoint(config, name)?;
        let grpc_name = spec
            .grpc_names()
            .first()
            .copied()
            .unwrap_or_default()
            .to_owned();
        let started = Instant::now();
        let status = match channel(&url, &config.tls) {
            Ok(ch) => {
                let mut client = HealthClient::new(ch);
                let req = tonic_health::pb::HealthCheckRequest {
                    service: grpc_name.clone(),
                };
                match tokio::time::timeout(Duration::from_secs(3), client.check(req)).await {
                    Ok(Ok(r)) => match ServingStatus::try_from(r.into_inner().status) {
                        Ok(ServingStatus::Serving) => "SERVING".to_owned(),
                        Ok(s) => s.as_str_name().to_owned(),
                        Err(_) => "UNKNOWN".to_owned(),
                    },
                    Ok(Err(e)) => format!("UNREACHABLE ({:?})", e.code()),
                    Err(_) => "UNREACHABLE (timeout)".to_owned(),
                }
            }
            Err(e) => format!("ERROR ({e})"),
        };
        anyhow::Ok((name.to_string(), url, status, started.elapsed()))
    });
    let rows = futures::future::try_join_all(checks).await?;
    let all_ok = rows.iter().all(|r| r.2 == "SERVING");
    match output {
        Output::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|(n, u, s, d)| {
                    serde_json::json!({"service": format!("{n}-svc"), "endpoint": u, "status": s, "latency_ms": d.as_secs_f64() * 1000.0})
                })
                .collect();
            print_json(&v.into())?;
        }
        Output::Table => {
            println!(
                "{:<12} {:<28} {:<24} {:>10}",
                "SERVICE", "ENDPOINT", "STATUS", "LATENCY"
            );
            for (n, u, s, d) in &rows {
                println!(
                    "{:<12} {:<28} {:<24} {:>8.1}ms",
                    format!("{n}-svc"),
                    u,
                    s,
                    d.as_secs_f64() * 1000.0
                );
            }
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

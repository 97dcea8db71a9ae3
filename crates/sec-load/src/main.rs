//! `sec-load`: end-to-end load on an in-process platform (loopback only). Prints a table
//! and writes JSON (default `target/bench/load.json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sec_load::report::{Report, table};
use sec_load::scenarios::{self, Entry};
use sec_load::{Backends, RunParams, Target};
use serde::Serialize;

#[derive(Debug, Parser, Serialize)]
#[command(
    name = "sec-load",
    about = "Load the whole platform in-process on loopback and report throughput and latency"
)]
struct Args {
    /// Measurement window per scenario, seconds.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Warm-up per scenario before measuring, seconds.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Concurrent workers per scenario.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Stop measuring a scenario after this many calls (the duration still bounds it).
    #[arg(long)]
    max_requests: Option<u64>,
    /// Scenario to run (repeatable); default: all.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// JSON report path (directories are created).
    #[arg(long, default_value = "target/bench/load.json")]
    out: PathBuf,
    /// List the scenarios and exit.
    #[arg(long)]
    #[serde(skip)]
    list: bool,
    /// Backends the platform runs on.
    #[arg(long, value_enum, default_value_t = Backends::Embedded)]
    backends: Backends,
}

fn select(names: &[String]) -> anyhow::Result<Vec<Entry>> {
    let all = scenarios::all();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            all.iter().find(|e| e.name == n).copied().ok_or_else(|| {
                let known: Vec<_> = all.iter().map(|e| e.name).collect();
                anyhow::anyhow!("unknown scenario `{n}` (known: {})", known.join(", "))
            })
        })
        .collect()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let selected = select(&args.scenarios)?;
    let params = RunParams {
        concurrency: args.concurrency,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
        max_requests: args.max_requests,
    };
    eprintln!(
        "sec-load: starting the platform ({:?} backends) on loopback...",
        args.backends
    );
    let target = Target::start(args.backends).await?;
    let mut results = Vec::new();
    let mut failure = None;
    for e in &selected {
        eprintln!(
            "sec-load: {} ({} workers, {}s warm-up + {}s)",
            e.name, params.concurrency, args.warmup_secs, args.duration_secs
        );
        match (e.run)(&target, &params).await {
            Ok(r) => results.push(r),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    let stopped = target.stop().await;
    if let Some(e) = failure {
        return Err(e);
    }
    stopped?;
    print!("{}", table(&results));
    for r in results.iter().filter(|r| r.errors > 0) {
        eprintln!(
            "sec-load: {}: {} errors, first: {}",
            r.scenario,
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    let out = args.out.clone();
    Report::new(args, results).write(&out)?;
    eprintln!("sec-load: wrote {}", out.display());
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for e in scenarios::all() {
            println!("{:<24} {}", e.name, e.about);
        }
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sec-load: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sec-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

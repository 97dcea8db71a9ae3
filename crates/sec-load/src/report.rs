//! The table on stdout and the JSON file.

use std::path::Path;

use anyhow::Context as _;
use sec_common::clock::Clock;
use serde::Serialize;

use crate::runner::ScenarioResult;

/// Where the numbers were measured (no git, no host names).
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub nproc: usize,
    pub profile: &'static str,
    pub os: &'static str,
    pub arch: &'static str,
    pub sec_load_version: &'static str,
}

impl Environment {
    pub fn current() -> Self {
        Self {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            sec_load_version: env!("CARGO_PKG_VERSION"),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report<P: Serialize> {
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub timestamp_unix: u64,
    pub params: P,
    pub environment: Environment,
    pub results: Vec<ScenarioResult>,
}

impl<P: Serialize> Report<P> {
    /// A report stamped with the wall clock, read through the platform's `Clock`.
    pub fn new(params: P, results: Vec<ScenarioResult>) -> Self {
        Self::at(&sec_common::clock::SystemClock, params, results)
    }

    /// A report stamped with `clock`'s time (whole seconds; 0 before the epoch).
    pub fn at(clock: &dyn Clock, params: P, results: Vec<ScenarioResult>) -> Self {
        let unix = u64::try_from(clock.now().timestamp()).unwrap_or(0);
        Self {
            timestamp: rfc3339(unix),
            timestamp_unix: unix,
            params,
            environment: Environment::current(),
            results,
        }
    }

    /// Writes pretty JSON to `path`, creating its directories.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// `scenario | throughput (ops/s) | p50 (ms) | p99 (ms) | errors`
pub fn table(results: &[ScenarioResult]) -> String {
    let w = results
        .iter()
        .map(|r| r.scenario.len())
        .chain(["scenario".len()])
        .max()
        .unwrap_or(8);
    let mut out = format!(
        "{:<w$} | {:>18} | {:>9} | {:>9} | {:>6}\n",
        "scenario", "throughput (ops/s)", "p50 (ms)", "p99 (ms)", "errors"
    );
    out.push_str(&format!(
        "{}-|-{}-|-{}-|-{}-|-{}\n",
        "-".repeat(w),
        "-".repeat(18),
        "-".repeat(9),
        "-".repeat(9),
        "-".repeat(6)
    ));
    for r in results {
        out.push_str(&format!(
            "{:<w$} | {:>18.0} | {:>9.3} | {:>9.3} | {:>6}\n",
            r.scenario, r.throughput_ops_s, r.p50_ms, r.p99_ms, r.errors
        ));
    }
    out
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
fn rfc3339(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }
}

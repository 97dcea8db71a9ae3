//! Faults while audit-svc ingests (issue 19, "Faults and bad input"): the audit-svc
//! process killed with SIGKILL, PostgreSQL restarted, NATS restarted, each in the middle
//! of a stream of events. After each, every published event is stored exactly once, the
//! hash chain verifies, nothing was dead-lettered, and audit-svc is running and ready
//! again without anybody touching it (after the kill: once restarted, as a supervisor
//! would).
//!
//! Nothing here touches the shared servers: each test runs a private nats-server (own
//! `-sd` store) and a private PostgreSQL cluster (own `initdb`, run as user `postgres`
//! when this runs as root) on free loopback ports, and audit-svc itself as a child
//! process (`CARGO_BIN_EXE_audit-svc`) with its own data directory. Guards stop every
//! process and remove every directory, also when a test fails. Without nats-server or
//! the PostgreSQL binaries the tests skip loudly, and fail under
//! `SEC_TEST_BACKENDS=required`.
//!
//! crypto-svc is not run: audit-svc signs checkpoints through it, but ingest never waits
//! for it (see `checkpointer.rs`), so these runs store and chain events with no
//! checkpoint signed; the chain is verified from the genesis with the `verify` module
//! (VerifyChain over gRPC would need the checkpoint key in crypto-svc).
//!
//! The publisher is an `EventBus` with the NATS transport and a durable outbox, as every
//! service has, in this test process; it offers [`EVENTS`] events at [`RATE`] per second
//! and the fault is injected once a quarter of them are stored. The measured recovery
//! times are printed (`--nocapture`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)] // test code

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use audit_svc::chain::{CheckpointSigner, SignError};
use sec_common::config::EventsConfig;
use sec_common::events::nats::NatsTransport;
use sec_common::events::{EventBus, new_event};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const BIN: &str = env!("CARGO_BIN_EXE_audit-svc");
/// Events published per test.
const EVENTS: usize = 12_000;
/// Events offered per second: the stream lasts `EVENTS / RATE` = 6 s, the fault lands in it.
const RATE: usize = 2_000;
/// The fault is injected once this many events are stored.
const FAULT_AT: usize = EVENTS / 4;
/// How long PostgreSQL or NATS stays down, and audit-svc stays dead.
const OUTAGE: Duration = Duration::from_secs(3);
/// Bound on catching up after the fault ends. A batch audit-svc had fetched but not
/// acked when it died comes back after the consumer's ack wait (30 s).
const CATCH_UP: Duration = Duration::from_secs(40);
/// Bound on a whole scenario, servers' start to the last check.
const SCENARIO: Duration = Duration::from_secs(75);
/// A type in the event catalog (anything else is dead-lettered as `unknown_type`); the
/// stored rows of this type are exactly the publisher's, audit-svc's own are `sec.audit.*`.
const EVENT_TYPE: &str = "sec.auth.login.failed";
/// audit-svc's PostgreSQL schema (`storage.postgres_schema_prefix` is empty).
const SCHEMA: &str = "audit";

/// One scenario at a time: each runs three servers on two shared cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------
// The exactly-once comparison (tested on its own below: it detects a lost, a duplicated
// and a foreign id).

/// `Ok` when `stored` holds each id of `published` exactly once and nothing else.
fn exactly_once(published: &[String], stored: &[String]) -> Result<(), String> {
    let sent: BTreeSet<&String> = published.iter().collect();
    if sent.len() != published.len() {
        return Err(format!(
            "the publisher produced {} duplicate ids",
            published.len() - sent.len()
        ));
    }
    let got: BTreeSet<&String> = stored.iter().collect();
    let mut problems = Vec::new();
    if got.len() != stored.len() {
        problems.push(format!(
            "{} rows, {} distinct ids: stored twice",
            stored.len(),
            got.len()
        ));
    }
    let missing: Vec<_> = sent.difference(&got).take(3).collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} published ids not stored (e.g. {missing:?})",
            sent.difference(&got).count()
        ));
    }
    let extra: Vec<_> = got.difference(&sent).take(3).collect();
    if !extra.is_empty() {
        problems.push(format!(
            "{} stored ids never published (e.g. {extra:?})",
            got.difference(&sent).count()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[test]
fn exactly_once_detects_loss_duplicates_and_strangers() {
    let ids = |r: std::ops::Range<u32>| r.map(|i| format!("id-{i}")).collect::<Vec<_>>();
    let published = ids(0..10);
    assert_eq!(exactly_once(&published, &ids(0..10)), Ok(()));
    let mut shuffled = ids(0..10);
    shuffled.reverse();
    assert_eq!(exactly_once(&published, &shuffled), Ok(()), "order is free");

    let lost = exactly_once(&published, &ids(0..9)).unwrap_err();
    assert!(lost.contains("1 published ids not stored"), "{lost}");
    let mut twice = ids(0..10);
    twice.push("id-3".into());
    let dup = exactly_once(&published, &twice).unwrap_err();
    assert!(dup.contains("11 rows, 10 distinct ids"), "{dup}");
    let stranger = exactly_once(&published, &ids(0..11)).unwrap_err();
    assert!(
        stranger.contains("1 stored ids never published"),
        "{stranger}"
    );
    // A duplicate that hides a loss: same count, different set.
    let mut swapped = ids(0..9);
    swapped.push("id-0".into());
    let e = exactly_once(&published, &swapped).unwrap_err();
    assert!(
        e.contains("stored twice") && e.contains("not stored"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Private servers.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn wait_port(port: u16, up: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while port_open(port) != up {
        assert!(
            Instant::now() < deadline,
            "{what} on {port} never went {}",
            if up { "up" } else { "down" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Tools {
    nats_server: PathBuf,
    /// The directory holding `initdb` and `pg_ctl`.
    pg_bin: PathBuf,
}

fn find_tools() -> Result<Tools, String> {
    let nats_server = [
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/bin/nats-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .ok_or("no nats-server binary")?;
    // The newest /usr/lib/postgresql/<version>/bin, else initdb next to pg_ctl on the PATH.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    let pg_bin = versions
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .chain(["/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .ok_or("no initdb/pg_ctl (PostgreSQL server binaries)")?;
    Ok(Tools {
        nats_server,
        pg_bin,
    })
}

/// The tools, or `None` after a loud skip; a failure when backends are required.
fn tools(test: &str) -> Option<Tools> {
    match find_tools() {
        Ok(t) => Some(t),
        Err(why) => {
            assert!(
                !sec_testkit::backends_required(),
                "{test}: {why}, required (SEC_TEST_BACKENDS=required)"
            );
            sec_testkit::skipped(&format!("{test}: {why}"));
            None
        }
    }
}

/// A nats-server with JetStream on its own store directory.
struct Nats {
    bin: PathBuf,
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    fn start(bin: &Path) -> Self {
        let mut n = Self {
            bin: bin.to_owned(),
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.restart();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and store.
    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_port(self.port, true, "nats-server");
    }

    /// SIGKILL: no shutdown, no flush.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_port(self.port, false, "nats-server");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A PostgreSQL cluster of its own: `initdb` into a temporary directory, served on a
/// free loopback port with its socket in that directory.
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// Run the tools as user `postgres` (the server refuses to run as root).
    as_postgres: bool,
    running: bool,
}

impl Postgres {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn tool(&self, name: &str) -> Command {
        let tool = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        }
    }

    fn run(&self, mut cmd: Command, what: &str) -> Result<(), String> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        if as_postgres {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "running as root needs a user `postgres`"
                );
                String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
            };
            std::os::unix::fs::chown(dir.path(), Some(id("-u")), Some(id("-g"))).unwrap();
        }
        let mut pg = Self {
            bin: bin.to_owned(),
            dir,
            port: free_port(),
            as_postgres,
            running: false,
        };
        let mut initdb = pg.tool("initdb");
        initdb
            .arg("-D")
            .arg(pg.data())
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        pg.run(initdb, "initdb").unwrap();
        pg.restart();
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn restart(&mut self) {
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .arg("-o")
            // fsync off: a stopped or crashed server process loses nothing with it (its
            // writes are in the kernel's cache); only a machine crash would.
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            ))
            .args(["-w", "-t", "30", "start"]);
        self.running = true;
        if let Err(e) = self.run(cmd, "pg_ctl start") {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!("{e}\nserver log:\n{log}");
        }
    }

    /// `pg_ctl stop -m <mode>`; `immediate` is a crash (recovery at the next start).
    fn stop(&mut self, mode: &str) -> Result<(), String> {
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "20", "stop"]);
        let r = self.run(cmd, "pg_ctl stop");
        if r.is_ok() {
            self.running = false;
        }
        r
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        if self.stop("immediate").is_ok() {
            return;
        }
        // pg_ctl could not: kill the postmaster by the pid in its own pid file.
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned));
        if let Some(pid) = pid.filter(|p| p.chars().all(|c| c.is_ascii_digit())) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

/// The audit-svc binary as a child process, on free ports, its log in `log`.
struct AuditSvc {
    env: Vec<(String, String)>,
    admin_port: u16,
    log: PathBuf,
    child: Option<Child>,
    /// How often it was started.
    starts: u32,
}

impl AuditSvc {
    fn new(data_dir: &Path, pg_url: &str, nats_url: &str) -> Self {
        let (grpc, admin) = (free_port(), free_port());
        // Nothing listens there: checkpoints are not signed, ingest does not wait for them.
        let crypto = free_port();
        let env = [
            ("SEC_DATA_DIR", data_dir.display().to_string()),
            ("SEC_STORAGE__DATABASE_URL", pg_url.to_owned()),
            ("SEC_STORAGE__MAX_CONNECTIONS", "4".to_owned()),
            ("SEC_EVENTS__NATS_URL", nats_url.to_owned()),
            (
                "SEC_SERVICES__AUDIT__GRPC_ADDR",
                format!("127.0.0.1:{grpc}"),
            ),
            (
                "SEC_SERVICES__AUDIT__ADMIN_ADDR",
                format!("127.0.0.1:{admin}"),
            ),
            (
                "SEC_SERVICES__CRYPTO__GRPC_ADDR",
                format!("127.0.0.1:{crypto}"),
            ),
            ("SEC_SHUTDOWN__GRACE_SECONDS", "2".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec();
        Self {
            env,
            admin_port: admin,
            log: data_dir.with_extension("log"),
            child: None,
            starts: 0,
        }
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("SEC_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        self.starts += 1;
    }

    /// SIGKILL; returns how it ended.
    fn kill(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap()
    }

    /// `None` while it runs, else how it ended.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// The status code of `GET <path>` on its admin port (0: no answer).
    fn admin_get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.admin_port)),
            Duration::from_millis(500),
        ) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        let code = body
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, body)
    }

    /// Waits (bounded) until `/readyz` answers 200.
    fn wait_ready(&mut self, within: Duration) -> Duration {
        let t = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "audit-svc exited ({status}) before it was ready; log:\n{}",
                    self.log_tail()
                );
            }
            if self.admin_get("/readyz").0 == 200 {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < within,
                "audit-svc not ready within {within:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `name`'s value on `/metrics` (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for AuditSvc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading back.

/// Verification reads checkpoints only; these runs sign none (no crypto-svc).
struct NoCheckpoints;

#[async_trait]
impl CheckpointSigner for NoCheckpoints {
    async fn sign(&self, _: &[u8]) -> Result<(String, u32, String), SignError> {
        Err(SignError("no crypto-svc in the fault tests".into()))
    }
    async fn verify(&self, _: &str, _: &[u8], _: &str) -> Result<bool, SignError> {
        Err(SignError("no crypto-svc in the fault tests".into()))
    }
}

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(url)
        .unwrap()
}

/// Rows of the publisher's type; `None` while the database (or the table) is not there.
async fn stored_count(pool: &PgPool) -> Option<usize> {
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit.security_events WHERE event_type = $1")
            .bind(EVENT_TYPE)
            .fetch_one(pool)
            .await
            .ok()?;
    usize::try_from(n).ok()
}

/// Polls until `want` rows are stored or `within` passed; the count reached.
async fn wait_stored(pool: &PgPool, want: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = stored_count(pool).await.unwrap_or(0);
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// audit-svc's durable consumer: (delivered and not acked, not yet delivered).
async fn consumer_state(nats_url: &str) -> (u64, u64) {
    let cfg = EventsConfig::default();
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&cfg.stream)
        .await
        .unwrap()
        .get_consumer(&cfg.audit_consumer)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending as u64, info.num_pending)
}

// ---------------------------------------------------------------------------------------
// The scenario.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGKILL audit-svc, restart it after [`OUTAGE`].
    KillAudit,
    /// Crash PostgreSQL (`pg_ctl stop -m immediate`), start it after [`OUTAGE`].
    RestartPostgres,
    /// SIGKILL nats-server, start it after [`OUTAGE`] on the same store.
    RestartNats,
}

/// Offers [`EVENTS`] events at [`RATE`] per second; the ids accepted.
async fn publish(bus: EventBus) -> Vec<String> {
    let clock = sec_common::clock::system();
    let per_tick = RATE / 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut ids = Vec::with_capacity(EVENTS);
    let mut i = 0;
    while i < EVENTS {
        tick.tick().await;
        for _ in 0..per_tick.min(EVENTS - i) {
            let mut e = new_event(clock.as_ref(), "auth", EVENT_TYPE);
            e.subject = format!("user:u{}", i % 100);
            e.details.insert("i".into(), i.to_string());
            let id = e.id.clone();
            bus.publish(e)
                .unwrap_or_else(|err| panic!("publish {i} refused: {err}"));
            ids.push(id);
            i += 1;
        }
    }
    ids
}

async fn scenario(fault: Fault) {
    let _serial = SERIAL.lock().await;
    let Some(tools) = tools(&format!("audit-svc faults ({fault:?})")) else {
        return;
    };
    // On a timeout the scenario's future is dropped: its guards stop every server.
    if tokio::time::timeout(SCENARIO, run(fault, tools))
        .await
        .is_err()
    {
        panic!("[{fault:?}] did not finish within {SCENARIO:?}");
    }
}

async fn run(fault: Fault, tools: Tools) {
    let name = format!("{fault:?}");
    let t0 = Instant::now();
    let mut nats = Nats::start(&tools.nats_server);
    let mut pg = Postgres::start(&tools.pg_bin);
    let work = tempfile::tempdir().unwrap();
    let mut audit = AuditSvc::new(&work.path().join("audit-data"), &pg.url(), &nats.url());
    audit.start();
    let startup = audit.wait_ready(Duration::from_secs(20));
    let db = pool(&pg.url()).await;
    eprintln!(
        "[{name}] servers up in {:.1}s, audit-svc ready in {:.1}s",
        (t0.elapsed() - startup).as_secs_f64(),
        startup.as_secs_f64()
    );

    // The publisher: every accepted event is in its outbox before `publish` returns.
    let cfg = EventsConfig {
        outbox_dir: Some(work.path().join("publisher-outbox")),
        max_type_share_percent: 100,
        ..EventsConfig::default()
    };
    let transport = NatsTransport::connect(&nats.url(), &cfg, "faults-publisher")
        .await
        .unwrap();
    let bus =
        EventBus::with_outbox(Arc::new(transport), &cfg, sec_common::clock::system()).unwrap();
    let publisher = tokio::spawn(publish(bus.clone()));
    let stream_start = Instant::now();

    // Mid-stream: a quarter stored, the publisher still going.
    let before = wait_stored(&db, FAULT_AT, Duration::from_secs(15)).await;
    assert!(
        before >= FAULT_AT,
        "[{name}] only {before} stored before the fault; log:\n{}",
        audit.log_tail()
    );
    assert!(
        !publisher.is_finished(),
        "[{name}] the stream ended before the fault"
    );
    let fault_at = stream_start.elapsed();
    match fault {
        Fault::KillAudit => {
            let status = audit.kill();
            assert!(!status.success(), "killed, not exited: {status}");
            let (ack_pending, waiting) = consumer_state(&nats.url()).await;
            eprintln!(
                "[{name}] killed with {ack_pending} messages delivered and not acked, {waiting} not yet delivered"
            );
            tokio::time::sleep(OUTAGE).await;
            audit.start();
        }
        Fault::RestartPostgres => {
            pg.stop("immediate").unwrap();
            tokio::time::sleep(OUTAGE).await;
            assert!(
                audit.exited().is_none(),
                "[{name}] audit-svc died with the database; log:\n{}",
                audit.log_tail()
            );
            pg.restart();
        }
        Fault::RestartNats => {
            nats.kill();
            tokio::time::sleep(OUTAGE).await;
            assert!(
                bus.pending() > 0,
                "events wait in the publisher's outbox while the broker is down"
            );
            assert!(
                audit.exited().is_none(),
                "[{name}] audit-svc died with the broker; log:\n{}",
                audit.log_tail()
            );
            nats.restart();
        }
    }
    let fault_end = Instant::now();

    let published = tokio::time::timeout(Duration::from_secs(15), publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    assert_eq!(published.len(), EVENTS);
    let stream_end = stream_start.elapsed();
    assert_eq!(
        bus.flush(Duration::from_secs(15)).await,
        0,
        "[{name}] every accepted event reaches the broker"
    );
    let flushed = fault_end.elapsed();

    let stored = wait_stored(&db, EVENTS, CATCH_UP).await;
    let recovery = fault_end.elapsed();
    assert_eq!(
        stored,
        EVENTS,
        "[{name}] not caught up {CATCH_UP:?} after the fault; log:\n{}",
        audit.log_tail()
    );
    // Ready again by itself (the kill: in the process started afterwards).
    let ready_after = audit.wait_ready(Duration::from_secs(10));
    assert!(
        audit.exited().is_none(),
        "[{name}] audit-svc is running at the end"
    );
    assert_eq!(audit.starts, if fault == Fault::KillAudit { 2 } else { 1 });
    eprintln!(
        "[{name}] this audit-svc process: {} events newly stored, {} redelivered ones found already stored, {} batches failed and redelivered",
        audit.metric("sec_audit_events_ingested_total"),
        audit.metric("sec_audit_events_duplicate_total"),
        audit.metric("sec_audit_ingest_failures_total"),
    );
    eprintln!(
        "[{name}] fault {:.1}s into the {:.1}s stream ({before} of {EVENTS} stored), {:.0}s down; \
         after it ended: publisher's outbox empty in {:.1}s, all {EVENTS} stored in {:.1}s, \
         /readyz 200 {:.1}s later",
        fault_at.as_secs_f64(),
        stream_end.as_secs_f64(),
        OUTAGE.as_secs_f64(),
        flushed.as_secs_f64(),
        recovery.as_secs_f64(),
        ready_after.as_secs_f64()
    );

    // Exactly once: a late duplicate would show now, so wait a moment first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM audit.security_events WHERE event_type = $1")
            .bind(EVENT_TYPE)
            .fetch_all(&db)
            .await
            .unwrap();
    let rows: Vec<String> = rows.iter().map(ToString::to_string).collect();
    if let Err(e) = exactly_once(&published, &rows) {
        panic!("[{name}] {e}");
    }
    let (total, distinct, head): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM audit.security_events), \
                (SELECT count(DISTINCT id) FROM audit.security_events), \
                (SELECT seq FROM audit.audit_chain_head)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(total, distinct, "[{name}] an id stored twice");
    assert_eq!(
        head, total,
        "[{name}] every stored row has its place in the chain"
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM audit.dead_letters")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(dead, 0, "[{name}] an outage dead-letters nothing");

    // The hash chain, from the genesis (no checkpoint was signed without crypto-svc).
    let chain_pool = sec_common::storage::connect_postgres(&pg.url(), SCHEMA, 2)
        .await
        .unwrap();
    let store = audit_svc::store::postgres::PgEventStore::new(
        chain_pool.clone(),
        sec_common::clock::system(),
    );
    let report = audit_svc::verify::verify(&store, &NoCheckpoints, "faults", 0, 0)
        .await
        .unwrap();
    assert!(
        report.failure.is_none(),
        "[{name}] the chain does not verify: {report:?}"
    );
    assert_eq!(report.checkpoints, 0);
    assert!(
        report.records >= EVENTS as u64,
        "[{name}] the chain covers every event: {report:?}"
    );
    eprintln!(
        "[{name}] {EVENTS} published = {EVENTS} stored once each; chain of {} records verifies; \
         total {:.1}s",
        report.records,
        t0.elapsed().as_secs_f64()
    );
    chain_pool.close().await;
    db.close().await;
    drop(bus);
    drop(audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_svc_killed_mid_stream_restarts_and_stores_every_event_once() {
    scenario(Fault::KillAudit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_loses_and_duplicates_nothing() {
    scenario(Fault::RestartPostgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_loses_and_duplicates_nothing() {
    scenario(Fault::RestartNats).await;
}

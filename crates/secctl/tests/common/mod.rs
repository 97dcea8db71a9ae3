//! The harness the secctl binary tests share: run the real `secctl` against a platform
//! started in-process, with only the environment that points it there.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use sec_tests::TestPlatform;

pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn out(&self) -> String {
        String::from_utf8(self.stdout.clone()).unwrap()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} / {}", self.out(), self.stderr))
    }
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            0,
            "stderr: {}\nstdout: {}",
            self.stderr,
            self.out()
        );
        self
    }
}

/// The environment `secctl` gets: only what points it at this platform.
pub struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    pub fn new(tp: &TestPlatform, data_dir: &Path, token: Option<&str>) -> Self {
        let mut vars: Vec<(String, String)> = tp
            .grpc
            .iter()
            .map(|(svc, addr)| {
                (
                    format!("SEC_SERVICES__{}__GRPC_ADDR", svc.to_uppercase()),
                    addr.to_string(),
                )
            })
            .collect();
        assert_eq!(vars.len(), 7);
        vars.push(("SEC_DATA_DIR".into(), data_dir.display().to_string()));
        if let Some(t) = token {
            vars.push(("SEC_TOKEN".into(), t.into()));
        }
        Self { vars }
    }

    /// `secctl args…` with only this environment, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_secctl"));
        cmd.env_clear()
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .args(args);
        cmd
    }

    /// Runs `secctl args…` with its stdout already closed (`secctl … | head` after
    /// `head` exited): the exit code and stderr.
    pub async fn run_into_closed_pipe(&self, args: &[&str]) -> (i32, String) {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap();
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .await
        .unwrap()
    }

    /// Runs `secctl args…` with `stdin`, off the async workers so the in-process
    /// servers keep serving.
    pub async fn run(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_secctl"));
        cmd.env_clear()
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stdin = stdin.to_vec();
        let out = tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap();
            let mut pipe = child.stdin.take().unwrap();
            let writer = std::thread::spawn(move || {
                // a command that does not read stdin may close it early: ignore EPIPE
                let _ = pipe.write_all(&stdin);
            });
            let out = child.wait_with_output().unwrap();
            writer.join().unwrap();
            out
        })
        .await
        .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

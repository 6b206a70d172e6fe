//! Processes a worker starts: each VM's own process (detached, so it outlives the supervisor)
//! and the host tools it runs (`ip`, `nft`, `iptables`, `mkfs`, …).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boxd_vmm::api;
use serde::Serialize;

use crate::{Host, WorkerError, write_json};

impl Host {
    /// Writes `spec` to `file` in the VM's directory and starts `boxd <subcommand> --config
    /// <file> --api-sock <dir>/api.sock` detached, its output to `log` there.
    pub fn spawn_vm<T: Serialize>(
        &self,
        id: &str,
        subcommand: &str,
        file: &str,
        spec: &T,
        log: &str,
    ) -> Result<(), WorkerError> {
        let dir = self.vm_dir(id);
        let path = dir.join(file);
        write_json(&path, spec)?;
        let mut cmd = Command::new(&self.cfg.boxd);
        cmd.arg(subcommand)
            .arg("--config")
            .arg(&path)
            .arg("--api-sock")
            .arg(dir.join("api.sock"));
        self.spawn_detached(cmd, &dir, log)
    }
    /// Starts `cmd` as a VM process: its own session (a signal to the supervisor's group does
    /// not reach it), output to `log` in `dir`, reaped by a small thread while the supervisor
    /// lives (and by init after). Returns once the API socket answers.
    pub fn spawn_detached(
        &self,
        mut cmd: Command,
        dir: &Path,
        log: &str,
    ) -> Result<(), WorkerError> {
        let log_path = dir.join(log);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| WorkerError::Host(format!("{}: {e}", dir.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| WorkerError::Host(e.to_string()))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        if std::env::var_os("BOXD_LOG").is_none() {
            cmd.env("BOXD_LOG", "info");
        }
        // SAFETY: setsid is async-signal-safe and touches no Rust state.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let api = dir.join("api.sock");
        let mut child = cmd.spawn().map_err(|e| {
            WorkerError::Start(format!("cannot run {}: {e}", self.cfg.boxd.display()))
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let result = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Err(WorkerError::Start(format!(
                    "the VM process ended at once ({status}): {}",
                    tail(&log_path)
                )));
            }
            // `boxd vmm` answers while still paused, just before its vCPUs run.
            if api::probe(&api).is_some_and(|p| p.state == "running") {
                break Ok(());
            }
            if Instant::now() > deadline {
                _ = child.kill();
                break Err(WorkerError::Start(
                    "the VM process did not answer on its API socket within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        _ = std::thread::Builder::new()
            .name("vm-reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || child.wait());
        result
    }
}

/// Runs a host tool with `input` on its stdin; its stderr becomes the error.
pub(crate) fn stdin_tool(program: &str, args: &[&str], input: &str) -> Result<(), WorkerError> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| WorkerError::Host(format!("cannot run {program}: {e}")))?;
    if let Some(mut i) = child.stdin.take() {
        _ = i.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| WorkerError::Host(format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(WorkerError::Host(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs a host tool; its stderr becomes the error.
pub(crate) fn tool(program: &str, args: &[&str]) -> Result<(), WorkerError> {
    stdin_tool(program, args, "").map_err(|e| match e {
        WorkerError::Host(m) => {
            WorkerError::Host(format!("{m} (ran: {program} {})", args.join(" ")))
        }
        other => other,
    })
}

/// The last lines of a log, for error messages.
pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let out: Vec<&str> = lines.into_iter().rev().collect();
    if out.is_empty() {
        format!("nothing in {}", path.display())
    } else {
        out.join(" | ")
    }
}

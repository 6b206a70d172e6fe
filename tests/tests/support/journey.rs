//! What the journey tests share: a client in the test's namespace, guards that end VM
//! processes and servers however a test ends, and the VMs' API.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use boxd_tests::Netns;
use serde_json::Value;

/// The lobby's address on `boxd up`.
pub const LOBBY: &str = "127.77.0.1";

/// Ends every VM process of a data directory (through its API, then by signal) when the test
/// ends, however it ends: they are built to outlive boxd.
pub struct VmReaper(pub PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(self.0.join("vms")) {
            for e in rd.flatten() {
                let _ = api(
                    &e.path().join("api.sock"),
                    "PUT",
                    r#"{"action":"shutdown"}"#,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let needle = self.0.to_string_lossy().into_owned();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&needle) {
                    // SAFETY: plain kill(2) of a process this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // A killed monitor leaves its (now empty) cgroups behind.
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(rd) = std::fs::read_dir(self.0.join("vms")) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                boxd_worker::sandbox::remove_cgroups(&boxd_worker::cgroup_of(&id));
            }
        }
    }
}

/// One request on a VM's API socket (`GET /vm` or an action); the JSON body, if any.
pub fn api(sock: &Path, method: &str, body: &str) -> Option<Value> {
    let path = if method == "GET" {
        "/vm"
    } else {
        "/vm/actions"
    };
    let answer = boxd_vmm::api::request(sock, method, path, body).ok()?;
    serde_json::from_str(&answer).ok()
}

/// Kills a child process when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Client<'a> {
    pub ns: &'a Netns,
    pub key: PathBuf,
}

impl Client<'_> {
    /// `ssh -p 2222 <host> <args>`; (status, stdout, stderr).
    pub fn ssh(&self, host: &str, args: &[&str]) -> (i32, String, String) {
        boxd_test_support::run(
            self.ns
                .command("ssh")
                .args(boxd_tests::SSH_OPTS)
                .args(["-o", "BatchMode=yes", "-p", "2222", "-i"])
                .arg(&self.key)
                .arg(host)
                .args(args)
                .stdin(Stdio::null()),
        )
    }

    /// `scp`/`sftp` (`tool`) with the key, port 2222 and `args`; fails the test unless it
    /// succeeds.
    pub fn copy(&self, tool: &str, args: &[&str]) {
        let out = self
            .ns
            .command(tool)
            .args(boxd_tests::SSH_OPTS)
            .args(["-P", "2222", "-i"])
            .arg(&self.key)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn ok(&self, host: &str, args: &[&str]) -> String {
        let (code, out, err) = self.ssh(host, args);
        assert_eq!(code, 0, "ssh {host} {args:?}: {out}{err}");
        out
    }

    /// The public address `new` printed.
    pub fn new_vm(&self, name: &str) -> String {
        let out = self.ok(LOBBY, &["new", &format!("--name={name}")]);
        out.lines()
            .find_map(|l| l.trim().strip_prefix("address"))
            .map(|a| a.trim().to_owned())
            .unwrap_or_else(|| panic!("no address in {out}"))
    }
}

pub fn vm_pids(data: &Path) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = std::fs::read_dir(data.join("vms"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let v = api(&e.path().join("api.sock"), "GET", "")?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                v["pid"].as_i64()?,
            ))
        })
        .collect();
    out.sort();
    out
}

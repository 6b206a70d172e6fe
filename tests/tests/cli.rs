//! The `boxd` command line as a user meets it: `boxd up` with embedded defaults, the admin
//! socket, clear refusals of bad config and bad requests (exit code 2, nothing written), clean
//! shutdown on SIGTERM, and resuming the same cluster afterwards.

#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use boxd_tests::{Node, UP, boxd_bin, eventually, fake_worker, now_ms, write_config};
use serde_json::json;
use uuid::Uuid;

/// Runs `boxd` with `args` to completion.
fn boxd<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(boxd_bin()).args(args).output().unwrap()
}

fn field(ready: &str, key: &str) -> String {
    ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {ready}"))
        .to_owned()
}

#[test]
fn config_default_prints_a_file_that_checks() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(boxd_bin())
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("zone = \"boxd.test\""));
    assert!(text.contains("listen = \"127.0.0.1:5353\""));
    let path = dir.path().join("boxd.toml");
    std::fs::write(&path, &text).unwrap();
    let out = boxd([
        "config".as_ref(),
        "check".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config ok");
}

#[test]
fn bad_config_exits_2_names_the_field_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[cluster]\nzone = \"Bad Zone\"\n", "cluster.zone"),
        ("[cluster]\nlobby = 5\n", "cluster.lobby"),
        ("[raft]\nlisten = \"127.0.0.1:7000\"\nlisen = 1\n", "lisen"),
        ("[raft]\nelection_min_ms = 10\n", "raft.election_min_ms"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let data = dir.path().join(format!("data{i}"));
        for cmd in ["up", "init", "run"] {
            let out = boxd([
                cmd.as_ref(),
                "--data-dir".as_ref(),
                data.as_os_str(),
                "--config".as_ref(),
                cfg.as_os_str(),
            ]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {text:?}: {stderr}");
            assert!(stderr.contains(field), "{cmd} {text:?}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert!(!data.exists(), "{cmd} {text:?} wrote {}", data.display());
        }
    }
    let missing = dir.path().join("missing.toml");
    let out = boxd([
        "config".as_ref(),
        "check".as_ref(),
        "--config".as_ref(),
        missing.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn run_without_a_node_and_unknown_flags_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "n", "127.0.32.9:7000", "");
    let data = dir.path().join("d");
    let out = boxd([
        "run".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("boxd init"));
    let out = boxd(["up", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let nowhere = dir.path().join("nowhere");
    let out = boxd([
        "admin".as_ref(),
        "status".as_ref(),
        "--data-dir".as_ref(),
        nowhere.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `boxd up` running"));
}

#[test]
fn up_serves_admin_schedules_and_resumes_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "solo", "127.0.32.1:7000", "");
    let data = dir.path().join("data");
    let mut node = Node::start(&UP, &data, &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    assert_eq!(field(&ready, "node"), "1");
    assert_eq!(field(&ready, "zone"), "boxd.test");
    assert_eq!(field(&ready, "serving"), "control,proxy,dns");
    assert_eq!(field(&ready, "dns"), "127.0.32.1:5353");
    assert_eq!(field(&ready, "https"), "127.0.32.1:8443");
    assert!(field(&ready, "ca").ends_with("/tls/ca.crt"), "{ready}");
    let cluster = field(&ready, "cluster");

    let mode = std::fs::metadata(node.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket must be private");

    let mut admin = node.admin();
    let status = admin.ok(&json!({"op": "status"}));
    assert_eq!(status["replica"]["state"], "leader");
    assert_eq!(status["replica"]["leader"], 1);
    assert_eq!(status["cluster_id"], cluster.as_str());

    // Bad requests get an error object and the connection stays usable.
    for bad in [&b"{"[..], b"[]", b"{\"op\":\"reboot\"}", b"\xff\xfe", b""] {
        let r = admin.raw(bad);
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains("malformed"), "{r}");
    }
    assert_eq!(admin.call(&json!({"op": "status"}))["ok"], true);

    // A refused command comes back typed, state unchanged.
    let owner = Uuid::new_v4().to_string();
    let r = admin.ok(&json!({"op": "write", "command": {
        "type": "create_vm", "id": Uuid::new_v4(), "owner": owner, "name": "web",
        "http_port": 80, "at": now_ms(),
        "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}}}));
    assert_eq!(r["refused"]["error"], "not_found", "{r}");
    admin.ok(&json!({"op": "write", "command": {
        "type": "create_account", "id": owner, "name": "alice", "max_vms": null, "at": now_ms()}}));
    let vm = Uuid::new_v4().to_string();
    let r = admin.ok(&json!({"op": "write", "command": {
        "type": "create_vm", "id": vm, "owner": owner, "name": "web", "http_port": 80,
        "at": now_ms(), "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}}}));
    assert_eq!(r["outcome"]["public_ip"], "127.77.0.2", "{r}");

    // The scheduler places it on the one live worker (registered through the log; no process
    // runs it, so the VM stays placed).
    let worker = fake_worker(&node);
    assert_ne!(worker, 1);
    let placed = eventually(Duration::from_secs(10), "placement", || {
        let vms = node.admin().ok(&json!({"op": "vms"}));
        let v = vms.as_array().unwrap().first().cloned()?;
        (v["worker"] == worker).then_some(v)
    });
    assert_eq!(placed["observed"], "placed");

    // The human commands work against the same socket.
    for cmd in [["admin", "status"], ["admin", "members"], ["admin", "vms"]] {
        let out = boxd([
            cmd[0].as_ref(),
            cmd[1].as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ]);
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        if cmd[1] == "vms" {
            assert!(
                text.contains("web") && text.contains("127.77.0.2"),
                "{text}"
            );
        }
    }

    // A second boxd on the same data directory is refused.
    let out = boxd([
        "up".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));

    // SIGTERM: clean exit, socket removed.
    let status = node.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!node.socket().exists());

    // Resume: same cluster, same data, still writable.
    let node = Node::start(&UP, &data, &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    assert_eq!(field(&ready, "cluster"), cluster);
    let vms = node.admin().ok(&json!({"op": "vms"}));
    assert_eq!(vms[0]["id"], vm.as_str());
    let r = node.admin().ok(&json!({"op": "write", "command": {
        "type": "set_vm_desired", "by": owner, "vm": vm, "desired": "stopped", "at": now_ms()}}));
    assert_eq!(r["outcome"]["outcome"], "done", "{r}");
}

/// Issue 26, finding 4: under `ip netns exec` (which mounts a /sys of its own) the worker sees
/// no cgroup controllers; `boxd up` refuses to start, names the cause and the fix, and starts
/// no VM, instead of running VMs without limits.
#[test]
fn a_worker_that_cannot_limit_vms_refuses_to_start() {
    let ns = boxd_tests::Netns::new("nocg");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "nocg",
        "127.0.0.1:7000",
        "[worker]\nruntime = \"sandbox\"\n",
    );
    let out = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", ns.name()])
        .arg(boxd_bin())
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot limit VMs"), "{err}");
    assert!(err.contains("nsenter --net=/run/netns/NAME"), "{err}");
    assert!(!dir.path().join("data/vms").exists());
    // Finding 8: written to a file (here a pipe), the log has no colour codes.
    assert!(!err.contains('\u{1b}'), "ANSI codes in the log: {err}");
}

/// Issue 26, finding 9: a machine without the worker's tools hears what to install when
/// `boxd up` starts, not from a failing `new` later (here `nft` is not on PATH).
#[test]
fn a_worker_without_its_tools_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "notools", "127.0.46.1:7000", "");
    // `timeout` by its path: PATH has nothing in it.
    let out = Command::new("/usr/bin/timeout")
        .arg("30")
        .arg(boxd_bin())
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("apt-get install nftables"), "{err}");
    assert!(err.contains("--role control,proxy,dns"), "{err}");
}

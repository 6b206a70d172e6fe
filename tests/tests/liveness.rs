//! A worker that goes silent (issue 29, finding 2): its VMs were shown `running` forever and
//! the front doors blamed the VM. Now, once the worker has missed `missed_heartbeats`
//! heartbeats: `ls` and `show` say `unknown` and which worker has been silent for how long,
//! `boxd admin members` says `unreachable`, HTTPS answers 503 naming the worker, SSH says the
//! same, nothing new is placed there, and `rm` says the worker finishes it when it is back. A
//! worker heard from again brings its VMs back as they were reported.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use boxd_test_support::{SSH_OPTS, run};
use boxd_tests::at::{At, key};
use boxd_tests::{Admin, eventually, fake_worker, now_ms, ready_field as field, running_vm, write};
use serde_json::{Value, json};

const AT: At = At {
    ip: "127.0.47.1",
    https: 30470,
    ssh: 30472,
};

/// Heartbeats for the fake worker every 300 ms while `on` is set.
fn heartbeats(socket: std::path::PathBuf, worker: Value, on: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut admin = Admin::connect(&socket);
        let cap = json!({"vcpus": 1000, "memory_mib": 1_000_000, "disk_gib": 10_000});
        loop {
            if on.load(Ordering::SeqCst) {
                admin.call(&json!({"op": "write", "command": {
                    "type": "heartbeat", "node": worker, "capacity": cap, "at": now_ms()}}));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
}

#[test]
fn a_silent_worker_makes_its_vms_unknown_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (node, ready, _data) = AT.start_edited(
        d,
        "",
        &[(
            "heartbeat_secs = 60",
            "heartbeat_secs = 1\nmissed_heartbeats = 2",
        )],
    );
    let ca = field(&ready, "ca").to_owned();
    let alice = key(d, "alice");
    let me = AT.whoami(&alice);
    let worker = fake_worker(&node);
    let on = Arc::new(AtomicBool::new(true));
    heartbeats(node.socket(), worker.clone(), Arc::clone(&on));
    running_vm(&node, &me["id"], "web", 80, "127.0.47.9");
    let state = || {
        let (status, out, err) = AT.lobby(&alice, &["ls", "--json"]);
        assert_eq!(status, 0, "{err}");
        let vms: Value = serde_json::from_str(&out).unwrap();
        let web = vms.as_array().unwrap().iter().find(|v| v["name"] == "web");
        web.cloned().unwrap_or_default()
    };
    assert_eq!(state()["state"], "running", "{}", state());

    // Silent: past 2 s (two missed beats of 1 s) its VM is unknown, and says why.
    on.store(false, Ordering::SeqCst);
    let silent = eventually(Duration::from_secs(15), "the VM shows unknown", || {
        let v = state();
        (v["state"] == "unknown").then_some(v)
    });
    let why = silent["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        why.starts_with("worker fake-worker not heard from for "),
        "{silent}"
    );
    let (_, shown, _) = AT.lobby(&alice, &["show", "web"]);
    assert!(
        shown.contains("unknown") && shown.contains("fake-worker not heard from"),
        "{shown}"
    );
    let members = node.admin().ok(&json!({"op": "members"}));
    let of = |name: &str| {
        members
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| m["state"].clone())
    };
    assert_eq!(of("fake-worker"), Some(json!("unreachable")), "{members}");
    assert_eq!(of("id"), Some(json!("up")), "{members}");

    // The front doors name the worker instead of blaming the VM.
    let (status, page) = AT.curl(&ca, &AT.url("web", "/"), &[]);
    assert!(
        status == 503 && page.contains("fake-worker not heard from"),
        "{status} {page}"
    );
    let ip = silent["address"].as_str().unwrap().to_owned();
    let (_, _, err) = run(Command::new("ssh")
        .args(["-p", &AT.ssh.to_string(), "-i"])
        .arg(&alice)
        .args(SSH_OPTS)
        .args(["-o", "ConnectTimeout=10", &format!("root@{ip}"), "true"]));
    assert!(err.contains("fake-worker not heard from"), "{err}");

    // Nothing new goes there.
    write(
        &node,
        json!({"type": "create_vm", "id": "00000000-0000-4000-8000-0000000000b2",
               "owner": me["id"], "name": "later", "http_port": 80, "at": now_ms(),
               "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}}),
    );
    std::thread::sleep(Duration::from_secs(2));
    let vms = node.admin().ok(&json!({"op": "vms"}));
    let later = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "later")
        .unwrap();
    assert!(
        later["worker"].is_null(),
        "placed on a silent worker: {later}"
    );

    // Heard from again: back as reported (and the waiting VM is placed).
    on.store(true, Ordering::SeqCst);
    eventually(
        Duration::from_secs(15),
        "the VM shows running again",
        || (state()["state"] == "running").then_some(()),
    );

    // Silent again, `rm` says who finishes it.
    on.store(false, Ordering::SeqCst);
    eventually(
        Duration::from_secs(15),
        "the VM shows unknown again",
        || (state()["state"] == "unknown").then_some(()),
    );
    let (status, out, err) = AT.lobby(&alice, &["rm", "web"]);
    assert_eq!(status, 0, "{err}");
    assert!(
        out.contains("deleted web; worker fake-worker not heard from")
            && out.contains("when it is back"),
        "{out}"
    );
}

//! Three `boxd` processes on loopback: 1,000 writes through followers while the leader is
//! killed with SIGKILL; afterwards every acknowledged write is on every node, no VM name or
//! (owner, address) pair is duplicated, and a learner that joins late catches up by snapshot.
//! Before that, every write made through a follower is in its replica when it returns.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boxd_controlplane::model::Fingerprint;
use boxd_tests::{Admin, Node, eventually, now_ms, write_config};
use serde_json::{Value, json};
use uuid::Uuid;

const WRITES: usize = 1000;
const WRITERS: usize = 8;

fn vms(node: &Node) -> Vec<Value> {
    node.admin()
        .ok(&json!({"op": "vms"}))
        .as_array()
        .unwrap()
        .clone()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Acked {
    id: String,
    ip: String,
}

#[test]
fn leader_kill_loses_no_acknowledged_write_and_late_learner_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [
        "127.0.31.1:7000",
        "127.0.31.2:7000",
        "127.0.31.3:7000",
        "127.0.31.4:7000",
    ];
    let extra = "snapshot_every = 200\nlogs_kept = 20\n";
    let cfgs: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| write_config(dir.path(), &format!("n{}", i + 1), a, extra))
        .collect();
    let data = |i: usize| dir.path().join(format!("n{}", i + 1));

    // Found the cluster and join two more control nodes (sequentially: ids 1, 2, 3).
    let mut nodes = vec![Node::start(&["init"], &data(0), &cfgs[0])];
    nodes[0].wait_ready(Duration::from_secs(30));
    let token = nodes[0]
        .admin()
        .ok(&json!({"op": "join-token", "roles": ["control"]}))["token"]
        .as_str()
        .unwrap()
        .to_owned();
    for (i, cfg) in cfgs.iter().enumerate().take(3).skip(1) {
        let n = Node::start(
            &["join", addrs[0], "--token", &token, "--role", "control"],
            &data(i),
            cfg,
        );
        n.wait_ready(Duration::from_secs(30));
        nodes.push(n);
    }
    eventually(Duration::from_secs(30), "three voters", || {
        let s = nodes[0].status();
        (s["replica"]["voters"].as_array().unwrap().len() == 3).then_some(())
    });

    // Accounts to own the VMs.
    let accounts: Vec<String> = (0..4).map(|_| Uuid::new_v4().to_string()).collect();
    for (i, a) in accounts.iter().enumerate() {
        let r = nodes[1].admin().ok(&json!({"op": "write", "command": {
            "type": "create_account", "id": a, "name": format!("acct{i}"), "max_vms": 1000, "at": now_ms()
        }}));
        assert_eq!(r["applied"], true, "{r}");
    }

    let leader_id = nodes[0].status()["replica"]["leader"].as_u64().unwrap();
    let leader = usize::try_from(leader_id).unwrap() - 1;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let sockets: Vec<_> = followers.iter().map(|f| nodes[*f].socket()).collect();

    // Read-your-writes: a write made through a follower is in that follower's replica when it
    // returns (issue 29, finding 1: a proxy looked a VM it had just created up in its replica
    // before the replica had it, and said the VM was deleted).
    let mut admin = Admin::connect(&sockets[0]);
    for i in 0..100u8 {
        let code = format!("{i:032x}");
        let r = admin.call(&json!({"op": "write", "command": {
            "type": "create_registration", "code": code,
            "fingerprint": Fingerprint::of_key_blob(&[i; 8]).to_string(),
            "public_key": "ssh-ed25519 AAAA x", "at": now_ms(), "expires_at": now_ms() + 3_600_000
        }}));
        assert_eq!(r["ok"], true, "{r}");
        let list = admin.call(&json!({"op": "registrations"}));
        let codes: Vec<&str> = list["result"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|k| k["code"].as_str())
            .collect();
        assert!(
            codes.contains(&code.as_str()),
            "write {i} is not yet in the replica of the follower that made it"
        );
    }
    drop(admin);

    // Writers, each on its own admin connection to a follower.
    let acked: Arc<Mutex<BTreeMap<String, Acked>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let after_kill = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (acked, failed, done) = (acked.clone(), failed.clone(), done.clone());
            let (killed, after_kill) = (killed.clone(), after_kill.clone());
            let socket = sockets[t % sockets.len()].clone();
            let accounts = accounts.clone();
            std::thread::spawn(move || {
                let mut admin = Admin::connect(&socket);
                for i in (t..WRITES).step_by(WRITERS) {
                    let name = format!("vm-{i}");
                    let id = Uuid::new_v4().to_string();
                    let r = admin.call(&json!({"op": "write", "command": {
                        "type": "create_vm", "id": id, "owner": accounts[i % accounts.len()],
                        "name": name, "http_port": 80, "at": now_ms(),
                        "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}
                    }}));
                    if r["ok"] == true {
                        let outcome = &r["result"]["outcome"];
                        assert_eq!(outcome["outcome"], "vm_created", "{name}: {r}");
                        assert_eq!(outcome["id"], id.as_str());
                        let ip = outcome["public_ip"].as_str().unwrap().to_owned();
                        acked.lock().unwrap().insert(name, Acked { id, ip });
                        if killed.load(Ordering::SeqCst) {
                            after_kill.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        failed.lock().unwrap().push(format!("{name}: {r}"));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    eventually(Duration::from_secs(120), "400 writes", || {
        (done.load(Ordering::SeqCst) >= 400).then_some(())
    });
    nodes[leader].kill9();
    killed.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    eprintln!(
        "acknowledged {} of {WRITES}, {} failed, {} acknowledged after the kill",
        acked.len(),
        failed.len(),
        after_kill.load(Ordering::SeqCst)
    );
    assert!(
        after_kill.load(Ordering::SeqCst) > 0,
        "no write succeeded after the leader died"
    );
    assert!(
        failed.is_empty(),
        "writes must wait for the new leader, not fail: {failed:?}"
    );

    // The old leader comes back and catches up.
    nodes[leader] = Node::start(&["run"], &data(leader), &cfgs[leader]);
    nodes[leader].wait_ready(Duration::from_secs(30));
    let converged = |nodes: &[Node]| {
        let s: Vec<Value> = nodes.iter().map(Node::status).collect();
        let applied: BTreeSet<u64> = s
            .iter()
            .map(|s| s["replica"]["applied_index"].as_u64().unwrap())
            .collect();
        let lag_free = s.iter().all(|s| s["replica"]["replica_lag"] == 0);
        (applied.len() == 1 && lag_free).then_some(())
    };
    eventually(Duration::from_secs(30), "replicas converge", || {
        converged(&nodes[..3])
    });

    // Every acknowledged write on every node; no duplicates; identical replicas.
    let mut lists = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let list = vms(n);
        let mut names = HashMap::new();
        let mut owner_ips = BTreeSet::new();
        for v in &list {
            let name = v["name"].as_str().unwrap().to_owned();
            assert!(
                names.insert(name.clone(), v.clone()).is_none(),
                "node {i}: duplicate name {name}"
            );
            let pair = (v["owner"].to_string(), v["public_ip"].to_string());
            assert!(
                owner_ips.insert(pair.clone()),
                "node {i}: duplicate owner/IP {pair:?}"
            );
        }
        for (name, a) in &acked {
            let v = names
                .get(name)
                .unwrap_or_else(|| panic!("node {i} lost acknowledged write {name}"));
            assert_eq!(v["id"], a.id.as_str(), "node {i}: {name}");
            assert_eq!(v["public_ip"], a.ip.as_str(), "node {i}: {name}");
        }
        lists.push(list);
    }
    assert!(
        lists[0] == lists[1] && lists[0] == lists[2],
        "replicas differ"
    );

    // The leader has snapshotted and purged, so a new learner cannot be fed from the log alone.
    let leader_now = eventually(Duration::from_secs(10), "a leader", || {
        nodes[0].status()["replica"]["leader"].as_u64()
    });
    let ls = nodes[usize::try_from(leader_now).unwrap() - 1].status();
    assert!(
        ls["replica"]["purged_index"].as_u64().unwrap_or(0) > 0,
        "leader has not purged its log: {ls}"
    );
    let follower = (0..3)
        .find(|i| *i + 1 != usize::try_from(leader_now).unwrap())
        .unwrap();
    let token = nodes[0]
        .admin()
        .ok(&json!({"op": "join-token", "roles": ["dns"]}))["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Join through a follower: the request is forwarded to the leader.
    let learner = Node::start(
        &["join", addrs[follower], "--token", &token, "--role", "dns"],
        &data(3),
        &cfgs[3],
    );
    learner.wait_ready(Duration::from_secs(60));
    nodes.push(learner);
    eventually(Duration::from_secs(30), "learner converges", || {
        converged(&nodes)
    });
    let s = nodes[3].status();
    assert_eq!(s["replica"]["state"], "learner", "{s}");
    assert!(
        s["replica"]["snapshots_installed"].as_u64().unwrap() >= 1,
        "learner did not install a snapshot: {s}"
    );
    // The scheduler keeps placing VMs (the learner is a worker), so compare fresh reads once
    // every node has applied the same index.
    eventually(Duration::from_secs(30), "identical replicas", || {
        converged(&nodes)?;
        let all: Vec<Vec<Value>> = nodes.iter().map(vms).collect();
        all.iter().all(|l| *l == all[0]).then_some(())
    });
    let members = nodes[0].admin().ok(&json!({"op": "members"}));
    let learners: Vec<&Value> = members
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["membership"] == "learner")
        .collect();
    assert_eq!(learners.len(), 1, "{members}");
    assert_eq!(learners[0]["roles"], json!(["dns"]));
}

//! Unit tests of `view.rs` (kept apart so the module reads in one go).

use super::*;
use uuid::Uuid;

fn settings() -> ClusterSettings {
    ClusterSettings {
        cluster_id: Uuid::nil(),
        zone: "boxd.test".into(),
        lobby: "127.77.0.1".parse().unwrap(),
        public_pool: "127.77.0.0/16".parse().unwrap(),
        max_vms_per_account: 10,
        created_at: 0,
    }
}

fn route(name: &str, owner: AccountId, ip: &str) -> VmRoute {
    VmRoute {
        id: VmId::random(),
        name: name.into(),
        owner,
        public_ip: ip.parse().unwrap(),
        private_ip: None,
        http_port: 80,
        desired: Desired::Running,
        observed: Observed::Running,
        reason: None,
        agent_key: None,
        worker: Some(1),
    }
}

#[test]
fn ssh_route_needs_the_owners_key_and_the_address() {
    let (alice, bob) = (AccountId::random(), AccountId::random());
    let (ka, kb) = (
        Fingerprint::of_key_blob(b"a"),
        Fingerprint::of_key_blob(b"b"),
    );
    let a = route("a", alice, "127.77.0.2");
    let b = route("b", bob, "127.77.0.2");
    let v = View::build(
        1,
        Some(settings()),
        [a.clone(), b.clone()],
        [(ka.clone(), alice), (kb.clone(), bob)],
    );
    let ip = "127.77.0.2".parse().unwrap();
    assert_eq!(v.ssh_route(&ka, ip).unwrap().id, a.id);
    assert_eq!(v.ssh_route(&kb, ip).unwrap().id, b.id);
    assert!(v.ssh_route(&ka, "127.77.0.3".parse().unwrap()).is_none());
    assert!(
        v.ssh_route(&Fingerprint::of_key_blob(b"c"), ip).is_none(),
        "unknown key"
    );
}

#[test]
fn host_lookup_is_case_insensitive_and_zone_bound() {
    let owner = AccountId::random();
    let v = View::build(
        1,
        Some(settings()),
        [route("myapp", owner, "127.77.0.2")],
        [],
    );
    for host in ["myapp.boxd.test", "MyApp.Boxd.Test", "myapp.boxd.test."] {
        assert_eq!(v.vm_by_host(host).unwrap().name, "myapp", "{host}");
    }
    for host in [
        "myapp.other.test",
        "boxd.test",
        "x.myapp.boxd.test",
        "",
        ".",
    ] {
        assert!(v.vm_by_host(host).is_none(), "{host}");
    }
}

#[test]
fn patch_moves_and_removes_entries() {
    let owner = AccountId::random();
    let fp = Fingerprint::of_key_blob(b"key");
    let r = route("a", owner, "127.77.0.2");
    let mut v = View::build(1, Some(settings()), [r.clone()], [(fp.clone(), owner)]);
    let before = v.clone();
    // A change that keeps name and address (the worker's report) keeps every lookup.
    let mut stopped = r.clone();
    stopped.observed = Observed::Stopped;
    v.patch(2, [ViewChange::VmUpsert(Arc::new(stopped))]);
    assert_eq!(v.vm_by_name("a").unwrap().observed, Observed::Stopped);
    let old_ip = "127.77.0.2".parse().unwrap();
    assert_eq!(
        v.ssh_route(&fp, old_ip).unwrap().observed,
        Observed::Stopped
    );
    let mut moved = r.clone();
    moved.name = "b".into();
    moved.public_ip = "127.77.0.3".parse().unwrap();
    v.patch(2, [ViewChange::VmUpsert(Arc::new(moved))]);
    assert!(v.vm_by_name("a").is_none());
    assert!(
        v.ssh_route(&fp, old_ip).is_none(),
        "the old address is free"
    );
    assert_eq!(
        v.vm_by_name("b").unwrap().public_ip.to_string(),
        "127.77.0.3"
    );
    assert_eq!(
        v.ssh_route(&fp, "127.77.0.3".parse().unwrap())
            .unwrap()
            .name,
        "b"
    );
    assert_eq!(v.vm_count(), 1);
    assert_eq!(
        before.vm_by_name("a").unwrap().id,
        r.id,
        "old snapshot unchanged"
    );
    v.patch(3, [ViewChange::VmRemove(r.id)]);
    assert_eq!(v.vm_count(), 0);
    assert_eq!(v.applied(), 3);
}

/// The lobby and the addresses VMs have are ours; the rest of the pool is not (issue 25:
/// unallocated pool addresses were served). An address two owners' VMs share stays ours
/// until both are gone, and one a VM moves off is released.
#[test]
fn public_address_check() {
    let (a, b) = (AccountId::random(), AccountId::random());
    let ra = route("a", a, "127.77.3.4");
    let rb = route("b", b, "127.77.3.4");
    let mut v = View::build(1, Some(settings()), [ra.clone(), rb.clone()], []);
    let ours = |v: &View, ip: &str| v.is_public_address(ip.parse().unwrap());
    assert!(ours(&v, "127.77.0.1"));
    assert!(ours(&v, "127.77.3.4"));
    assert!(!ours(&v, "127.77.3.5"), "an unallocated pool address");
    assert!(!ours(&v, "127.0.0.1"));
    assert!(!ours(&View::default(), "127.77.0.1"));
    v.patch(2, [ViewChange::VmRemove(ra.id)]);
    assert!(ours(&v, "127.77.3.4"), "b still has it");
    let mut moved = rb.clone();
    moved.public_ip = "127.77.3.5".parse().unwrap();
    v.patch(3, [ViewChange::VmUpsert(Arc::new(moved))]);
    assert!(!ours(&v, "127.77.3.4"));
    assert!(ours(&v, "127.77.3.5"));
    v.patch(4, [ViewChange::VmRemove(rb.id)]);
    assert!(!ours(&v, "127.77.3.5"));
}

#[test]
fn names_in_the_zone() {
    let v = View::build(1, Some(settings()), [], []);
    for yes in ["boxd.test", "BOXD.test.", "a.boxd.test", "x.y.Boxd.Test."] {
        assert!(v.in_zone(yes), "{yes}");
    }
    for no in [
        "evil.example",
        "aboxd.test",
        ".boxd.test",
        "boxd.test.evil",
        "ä.boxd.tes",
        "",
    ] {
        assert!(!v.in_zone(no), "{no}");
    }
    assert!(
        v.vm_by_host("\u{e4}boxd.test").is_none(),
        "multi-byte names do not panic"
    );
    assert!(!View::default().in_zone("boxd.test"));
}

#[tokio::test]
async fn handle_notifies_subscribers() {
    let h = ViewHandle::new();
    let mut rx = h.subscribe();
    h.update(5, vec![ViewChange::Settings(settings())]);
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow(), 5);
    assert_eq!(h.current().zone(), Some("boxd.test"));
}

/// A reproducible stream of indexes below `n` (xorshift).
fn indexes(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        usize::try_from(seed % n as u64).unwrap()
    }
}

#[test]
fn patching_gives_what_building_from_the_routes_gives() {
    // Renames, moves to another address or owner, deletions and re-creations, with names
    // and (owner, address) pairs unique as the control plane keeps them: no key of an
    // earlier version of a VM may survive in any map.
    let owners: Vec<AccountId> = (0..3).map(|_| AccountId::random()).collect();
    let ids: Vec<VmId> = (0..30).map(|_| VmId::random()).collect();
    let mut next = indexes(0x9e37_79b9_7f4a_7c15);
    let mut routes: std::collections::BTreeMap<VmId, VmRoute> = Default::default();
    let mut view = View::build(1, Some(settings()), [], []);
    for step in 2..3_000u64 {
        let id = ids[next(ids.len())];
        let change = if next(5) == 0 {
            routes.remove(&id);
            ViewChange::VmRemove(id)
        } else {
            let name = if next(40) == 0 {
                "x".repeat(64) // over a DNS label: in no name map
            } else {
                format!("vm{}", next(50))
            };
            let mut r = route(
                &name,
                owners[next(owners.len())],
                &format!("127.77.0.{}", 2 + next(40)),
            );
            r.id = id;
            let clash = routes.values().any(|o| {
                o.id != id && (o.name == r.name || (o.owner, o.public_ip) == (r.owner, r.public_ip))
            });
            if clash {
                continue;
            }
            routes.insert(id, r.clone());
            ViewChange::VmUpsert(Arc::new(r))
        };
        view.patch(step, [change]);
        let built = View::build(step, Some(settings()), routes.values().cloned(), []);
        assert_eq!(view, built, "step {step}");
    }
}

/// The two copies behind a `ViewHandle` take turns; whatever the order of updates,
/// wholesale publications and readers holding on to old Views (which sends an update down
/// the cloning path), the published View is always the one plain patching gives.
#[test]
fn the_handle_publishes_what_patching_gives() {
    let owners: Vec<AccountId> = (0..3).map(|_| AccountId::random()).collect();
    let ids: Vec<VmId> = (0..40).map(|_| VmId::random()).collect();
    let mut next = indexes(0x2545_f491_4f6c_dd1d);
    let handle = ViewHandle::new();
    let mut want = View::build(1, Some(settings()), [], []);
    handle.publish(want.clone());
    let mut held = Vec::new();
    for step in 2..2_000u64 {
        let changes: Vec<ViewChange> = (0..1 + next(4))
            .map(|_| match next(10) {
                0 => ViewChange::VmRemove(ids[next(ids.len())]),
                1 => ViewChange::KeyUpsert(
                    Fingerprint::of_key_blob(&[u8::try_from(next(8)).unwrap()]),
                    owners[next(owners.len())],
                ),
                2 => ViewChange::KeyRemove(Fingerprint::of_key_blob(&[
                    u8::try_from(next(8)).unwrap()
                ])),
                3 => ViewChange::TxtUpsert(format!("t{}", next(4)), Arc::from(vec!["x".into()])),
                4 => ViewChange::TxtRemove(format!("t{}", next(4))),
                _ => {
                    let mut r = route(
                        &format!("vm{}", next(60)),
                        owners[next(owners.len())],
                        &format!("127.77.0.{}", 2 + next(20)),
                    );
                    r.id = ids[next(ids.len())];
                    ViewChange::VmUpsert(Arc::new(r))
                }
            })
            .collect();
        want.patch(step, changes.clone());
        match next(20) {
            // A wholesale publication (startup, snapshot install).
            0 => handle.publish(want.clone()),
            // A reader keeps the current View across the next update or two.
            1 | 2 => {
                held.push(handle.snapshot());
                handle.update(step, changes);
            }
            _ => handle.update(step, changes),
        }
        if next(3) == 0 {
            held.clear();
        }
        assert_eq!(**handle.current(), want, "step {step}");
    }
}

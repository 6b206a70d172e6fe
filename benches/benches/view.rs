//! Publishing the View: a patch after an applied batch costs O(changed entries), not O(all VMs).
//! Compares patching 1 and 100 VMs into Views of 1k, 10k and 100k VMs with rebuilding the View
//! from scratch, and times the data plane's lookups at 100k.
//!
//! `cargo bench -p boxd-benches --bench view`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::net::Ipv4Addr;

use boxd_controlplane::model::{AccountId, Fingerprint, Observed, VmId};
use boxd_controlplane::view::{View, ViewChange, ViewHandle, VmRoute};
use boxd_test_support::fixtures;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use uuid::Uuid;

/// `n` VMs owned by `n / 10` accounts with one key each.
fn state(n: usize) -> (Vec<VmRoute>, Vec<(Fingerprint, AccountId)>) {
    let accounts: Vec<AccountId> = (0..n.div_ceil(10))
        .map(|i| AccountId(Uuid::from_u128(i as u128 + 1)))
        .collect();
    let keys = accounts
        .iter()
        .map(|a| (Fingerprint::of_key_blob(a.0.as_bytes()), *a))
        .collect();
    let routes = (0..n)
        .map(|i| VmRoute {
            private_ip: Some(Ipv4Addr::from(0x0a00_0000 + i as u32)),
            ..fixtures::route(
                VmId(Uuid::from_u128(1 << 64 | i as u128)),
                format!("vm-{i}"),
                accounts[i / 10],
                Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 77, 0, 2)) + (i % 10) as u32),
            )
        })
        .collect();
    (routes, keys)
}

fn changes(routes: &[VmRoute], k: usize) -> Vec<ViewChange> {
    routes
        .iter()
        .step_by(routes.len() / k)
        .take(k)
        .map(|r| {
            let mut r = r.clone();
            r.observed = Observed::Stopped;
            ViewChange::VmUpsert(std::sync::Arc::new(r))
        })
        .collect()
}

fn publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("view_publish");
    for n in [1_000usize, 10_000, 100_000] {
        let (routes, keys) = state(n);
        let view = View::build(
            1,
            Some(fixtures::settings(100)),
            routes.clone(),
            keys.clone(),
        );
        let handle = ViewHandle::new();
        handle.publish(view);
        for k in [1usize, 100] {
            let batch = changes(&routes, k);
            g.bench_with_input(BenchmarkId::new(format!("patch_{k}"), n), &n, |b, _| {
                let mut applied = 1;
                b.iter(|| {
                    applied += 1;
                    handle.update(applied, black_box(batch.clone()));
                });
            });
        }
        g.bench_with_input(BenchmarkId::new("rebuild", n), &n, |b, _| {
            b.iter(|| {
                handle.publish(View::build(
                    1,
                    Some(fixtures::settings(100)),
                    black_box(routes.clone()),
                    keys.clone(),
                ))
            });
        });
    }
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let (routes, keys) = state(100_000);
    let handle = ViewHandle::new();
    handle.publish(View::build(
        1,
        Some(fixtures::settings(100)),
        routes.clone(),
        keys.clone(),
    ));
    let fp = keys[5_000].0.clone();
    let ip = routes[50_003].public_ip;
    let mut g = c.benchmark_group("view_lookup_100k");
    g.bench_function("ssh_route", |b| {
        b.iter(|| {
            handle
                .current()
                .ssh_route(black_box(&fp), black_box(ip))
                .map(|r| r.id)
        })
    });
    g.bench_function("vm_by_host", |b| {
        b.iter(|| {
            handle
                .current()
                .vm_by_host(black_box("VM-77777.boxd.test"))
                .map(|r| r.public_ip)
        })
    });
    g.finish();
}

criterion_group!(benches, publish, lookup);
criterion_main!(benches);

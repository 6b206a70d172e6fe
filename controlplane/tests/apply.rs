//! Apply as a pure function of (state, command): one scripted history, each step with the answer
//! it must get. Every refused step must leave the tables byte-for-byte unchanged, and replaying
//! the history on a second database must give the same state (determinism).

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::Ipv4Addr;

use boxd_controlplane::command::{ApplyError, Command, Outcome, Response};
use boxd_controlplane::model::{
    AccountId, Capacity, Desired, Fingerprint, ImageAd, Observed, TlsMaterial, TokenId, VmId,
    VmSpec, parse_roles,
};
use boxd_controlplane::store::apply::Applier;
use boxd_controlplane::store::{rows, schema};
use boxd_controlplane::tokens::SigningKey;
use rusqlite::Connection;
use uuid::Uuid;

mod common;
use common::digest;

fn db() -> Connection {
    let c = Connection::open_in_memory().unwrap();
    schema::migrate(&c).unwrap();
    c
}

fn apply(c: &mut Connection, cmd: &Command) -> Response {
    Applier::default().apply(c, cmd).unwrap()
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";

struct Ids {
    cluster: Uuid,
    alice: AccountId,
    bob: AccountId,
    ka: Fingerprint,
    ka2: Fingerprint,
    kb: Fingerprint,
    vm1: VmId,
    vm2: VmId,
    vm3: VmId,
    vmb: VmId,
    tok: TokenId,
}

fn ids() -> Ids {
    Ids {
        cluster: Uuid::from_u128(1),
        alice: AccountId(Uuid::from_u128(10)),
        bob: AccountId(Uuid::from_u128(11)),
        ka: Fingerprint::of_key_blob(b"alice"),
        ka2: Fingerprint::of_key_blob(b"alice2"),
        kb: Fingerprint::of_key_blob(b"bob"),
        vm1: VmId(Uuid::from_u128(100)),
        vm2: VmId(Uuid::from_u128(101)),
        vm3: VmId(Uuid::from_u128(102)),
        vmb: VmId(Uuid::from_u128(103)),
        tok: TokenId(Uuid::from_u128(200)),
    }
}

fn init(pool: &str, quota: u32) -> Command {
    Command::InitCluster {
        cluster_id: ids().cluster,
        secret: SECRET.into(),
        zone: "boxd.test".into(),
        lobby: "127.77.0.1".parse().unwrap(),
        public_pool: pool.parse().unwrap(),
        max_vms_per_account: quota,
        at: 1,
    }
}

fn account(id: AccountId, name: &str) -> Command {
    Command::CreateAccount {
        id,
        name: name.into(),
        max_vms: None,
        at: 2,
    }
}

fn key(account: AccountId, fp: &Fingerprint) -> Command {
    Command::AddSshKey {
        account,
        fingerprint: fp.clone(),
        public_key: format!("ssh-ed25519 AAAA {fp}"),
        at: 3,
    }
}

fn vm(id: VmId, owner: AccountId, name: &str) -> Command {
    vm_with(id, owner, name, VmSpec::default(), 80)
}

fn vm_with(id: VmId, owner: AccountId, name: &str, spec: VmSpec, http_port: u16) -> Command {
    Command::CreateVm {
        id,
        owner,
        name: name.into(),
        spec,
        http_port,
        at: 4,
    }
}

fn node(id: Option<u64>, uuid: u128, roles: &str, memory_mib: u64) -> Command {
    Command::RegisterNode {
        id,
        uuid: Uuid::from_u128(uuid),
        name: format!("node{uuid}"),
        roles: parse_roles(roles).unwrap(),
        raft_addr: "127.0.0.1:7000".into(),
        capacity: Capacity {
            vcpus: 4,
            memory_mib,
            disk_gib: 100,
        },
        at: 5,
    }
}

fn created(ip: &str) -> impl Fn(&Response) -> bool {
    let ip: Ipv4Addr = ip.parse().unwrap();
    move |r| matches!(r, Ok(Outcome::VmCreated { public_ip, .. }) if *public_ip == ip)
}

fn done(r: &Response) -> bool {
    matches!(r, Ok(Outcome::Done))
}

type Check = Box<dyn Fn(&Response) -> bool>;

/// An ed25519 public key in OpenSSH form.
const AGENT_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGM5wo8iHGGvERN08KOtflpBvvQG7sSiWz7cTEgubjk+";

fn history() -> Vec<(&'static str, Command, Check)> {
    let i = ids();
    let err = |f: fn(&ApplyError) -> bool| -> Check {
        Box::new(move |r| r.as_ref().err().is_some_and(f))
    };
    vec![
        (
            "account before init",
            account(i.alice, "alice"),
            err(|e| matches!(e, ApplyError::NotInitialized)),
        ),
        ("init", init("127.77.0.0/16", 3), Box::new(done)),
        (
            "init again, same cluster",
            init("127.77.0.0/16", 3),
            Box::new(done),
        ),
        (
            "init with another cluster id",
            match init("127.77.0.0/16", 3) {
                Command::InitCluster {
                    secret,
                    zone,
                    lobby,
                    public_pool,
                    max_vms_per_account,
                    at,
                    ..
                } => Command::InitCluster {
                    cluster_id: Uuid::from_u128(2),
                    secret,
                    zone,
                    lobby,
                    public_pool,
                    max_vms_per_account,
                    at,
                },
                _ => unreachable!(),
            },
            err(|e| matches!(e, ApplyError::AlreadyInitialized { .. })),
        ),
        ("create alice", account(i.alice, "alice"), Box::new(done)),
        (
            "create alice again (retry)",
            account(i.alice, "alice"),
            Box::new(done),
        ),
        (
            "bob takes alice's name",
            account(i.bob, "alice"),
            err(|e| matches!(e, ApplyError::AccountNameTaken { .. })),
        ),
        ("create bob", account(i.bob, "bob"), Box::new(done)),
        (
            "key for unknown account",
            key(AccountId(Uuid::from_u128(99)), &i.ka),
            err(|e| matches!(e, ApplyError::NotFound { .. })),
        ),
        ("alice's key", key(i.alice, &i.ka), Box::new(done)),
        ("alice's key again", key(i.alice, &i.ka), Box::new(done)),
        (
            "bob claims alice's key",
            key(i.bob, &i.ka),
            err(|e| matches!(e, ApplyError::KeyTaken { .. })),
        ),
        ("bob's key", key(i.bob, &i.kb), Box::new(done)),
        (
            "alice removes her last key",
            Command::RemoveSshKey {
                account: i.alice,
                fingerprint: i.ka.clone(),
            },
            err(|e| matches!(e, ApplyError::LastKey)),
        ),
        (
            "bob removes alice's key",
            Command::RemoveSshKey {
                account: i.bob,
                fingerprint: i.ka.clone(),
            },
            err(|e| matches!(e, ApplyError::NotYours { .. })),
        ),
        ("alice's second key", key(i.alice, &i.ka2), Box::new(done)),
        (
            "alice removes her second key",
            Command::RemoveSshKey {
                account: i.alice,
                fingerprint: i.ka2.clone(),
            },
            Box::new(done),
        ),
        (
            "bad vm name",
            vm(i.vm1, i.alice, "My App"),
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "bad vm spec",
            vm_with(
                i.vm1,
                i.alice,
                "app",
                VmSpec {
                    vcpus: 0,
                    ..VmSpec::default()
                },
                80,
            ),
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "http port 0",
            vm_with(i.vm1, i.alice, "app", VmSpec::default(), 0),
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "vm for unknown account",
            vm(i.vm1, AccountId(Uuid::from_u128(99)), "app"),
            err(|e| matches!(e, ApplyError::NotFound { .. })),
        ),
        (
            "alice's first vm gets the first pool address after the lobby",
            vm(i.vm1, i.alice, "app"),
            Box::new(created("127.77.0.2")),
        ),
        (
            "retried create returns the same vm",
            vm(i.vm1, i.alice, "app"),
            Box::new(created("127.77.0.2")),
        ),
        (
            "same id, other name",
            vm(i.vm1, i.alice, "other"),
            err(|e| matches!(e, ApplyError::IdConflict { .. })),
        ),
        (
            "bob takes the name",
            vm(i.vmb, i.bob, "app"),
            err(|e| matches!(e, ApplyError::NameTaken { .. })),
        ),
        (
            "bob's vm shares alice's address",
            vm(i.vmb, i.bob, "bobapp"),
            Box::new(created("127.77.0.2")),
        ),
        (
            "alice's second vm",
            vm(i.vm2, i.alice, "app2"),
            Box::new(created("127.77.0.3")),
        ),
        (
            "bob deletes alice's vm",
            Command::DeleteVm {
                by: i.bob,
                vm: i.vm1,
                at: 6,
            },
            err(|e| matches!(e, ApplyError::NotYours { .. })),
        ),
        (
            "alice deletes her first vm",
            Command::DeleteVm {
                by: i.alice,
                vm: i.vm1,
                at: 6,
            },
            Box::new(done),
        ),
        (
            "the name is free again",
            vm(i.vm3, i.alice, "app"),
            Box::new(created("127.77.0.2")),
        ),
        (
            "quota of 3",
            vm(VmId(Uuid::from_u128(104)), i.alice, "app4"),
            Box::new(created("127.77.0.4")),
        ),
        (
            "quota reached",
            vm(VmId(Uuid::from_u128(105)), i.alice, "app5"),
            err(|e| matches!(e, ApplyError::QuotaExceeded { limit: 3 })),
        ),
        // A create's refusals are worked out after the fact (apply.rs): these pin their order.
        (
            "a retried create at the quota still returns its vm",
            vm(i.vm2, i.alice, "app2"),
            Box::new(created("127.77.0.3")),
        ),
        (
            "a taken name is reported before the quota",
            vm(VmId(Uuid::from_u128(106)), i.alice, "bobapp"),
            err(|e| matches!(e, ApplyError::NameTaken { .. })),
        ),
        (
            "an id in use is reported before a bad name",
            vm(i.vm2, i.alice, "Not A Label"),
            err(|e| matches!(e, ApplyError::IdConflict { .. })),
        ),
        (
            "an id in use is reported before an unknown owner",
            vm(i.vm2, AccountId(Uuid::from_u128(999)), "app2"),
            err(|e| matches!(e, ApplyError::IdConflict { .. })),
        ),
        (
            "register control node with id 1",
            node(Some(1), 1, "control", 4096),
            Box::new(|r: &Response| matches!(r, Ok(Outcome::NodeRegistered { id: 1 }))),
        ),
        (
            "re-register is idempotent",
            node(None, 1, "control", 4096),
            Box::new(|r: &Response| matches!(r, Ok(Outcome::NodeRegistered { id: 1 }))),
        ),
        (
            "explicit id taken",
            node(Some(1), 2, "worker", 1024),
            err(|e| matches!(e, ApplyError::IdConflict { .. })),
        ),
        (
            "worker gets the next id",
            node(None, 2, "worker", 1024),
            Box::new(|r: &Response| matches!(r, Ok(Outcome::NodeRegistered { id: 2 }))),
        ),
        (
            "place on a non-worker",
            Command::PlaceVm {
                vm: i.vm2,
                worker: 1,
                at: 7,
            },
            err(|e| matches!(e, ApplyError::CannotPlace { .. })),
        ),
        (
            "place on the worker",
            Command::PlaceVm {
                vm: i.vm2,
                worker: 2,
                at: 7,
            },
            Box::new(done),
        ),
        (
            "place again on the same worker",
            Command::PlaceVm {
                vm: i.vm2,
                worker: 2,
                at: 7,
            },
            Box::new(done),
        ),
        (
            "place another 512 MiB vm",
            Command::PlaceVm {
                vm: i.vm3,
                worker: 2,
                at: 7,
            },
            Box::new(done),
        ),
        (
            "worker is full",
            Command::PlaceVm {
                vm: i.vmb,
                worker: 2,
                at: 7,
            },
            err(|e| matches!(e, ApplyError::CannotPlace { .. })),
        ),
        (
            "report from the wrong worker",
            Command::ReportVm {
                vm: i.vm2,
                worker: 1,
                observed: Observed::Running,
                reason: None,
                private_ip: None,
                at: 8,
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "report booting, with why",
            Command::ReportVm {
                vm: i.vm2,
                worker: 2,
                observed: Observed::Booting,
                reason: Some("virtualization here is emulated".into()),
                private_ip: Some("10.90.0.2".parse().unwrap()),
                at: 8,
            },
            Box::new(done),
        ),
        (
            "a reason longer than 1 KiB",
            Command::ReportVm {
                vm: i.vm2,
                worker: 2,
                observed: Observed::Failed,
                reason: Some("x".repeat(1025)),
                private_ip: None,
                at: 8,
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "report running",
            Command::ReportVm {
                vm: i.vm2,
                worker: 2,
                observed: Observed::Running,
                reason: None,
                private_ip: Some("10.90.0.2".parse().unwrap()),
                at: 8,
            },
            Box::new(done),
        ),
        (
            "an agent key from the wrong worker",
            Command::SetAgentKey {
                vm: i.vm2,
                worker: 1,
                key: AGENT_KEY.into(),
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "an agent key that is not one ed25519 key",
            Command::SetAgentKey {
                vm: i.vm2,
                worker: 2,
                key: format!("{AGENT_KEY} comment"),
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "the VM's agent key",
            Command::SetAgentKey {
                vm: i.vm2,
                worker: 2,
                key: AGENT_KEY.into(),
            },
            Box::new(done),
        ),
        (
            "an event from the VM's worker",
            Command::RecordVmEvent {
                vm: i.vm2,
                worker: 2,
                text: "started".into(),
                at: 8,
            },
            Box::new(done),
        ),
        (
            "an event of two lines",
            Command::RecordVmEvent {
                vm: i.vm2,
                worker: 2,
                text: "started\nforged".into(),
                at: 8,
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "a node publishes its images",
            Command::PublishImages {
                node: 2,
                images: vec![ImageAd {
                    name: "debian".into(),
                    digest: "ab".repeat(32),
                    bytes: 1 << 20,
                    built_at: 5,
                }],
            },
            Box::new(done),
        ),
        (
            "an image digest that is not SHA-256 hex",
            Command::PublishImages {
                node: 2,
                images: vec![ImageAd {
                    name: "debian".into(),
                    digest: "not-a-digest".into(),
                    bytes: 1,
                    built_at: 5,
                }],
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "images of a node that is not a member",
            Command::PublishImages {
                node: 99,
                images: vec![],
            },
            err(|e| matches!(e, ApplyError::NotFound { .. })),
        ),
        (
            "bob stops alice's vm",
            Command::SetVmDesired {
                by: i.bob,
                vm: i.vm2,
                desired: Desired::Stopped,
                at: 9,
            },
            err(|e| matches!(e, ApplyError::NotYours { .. })),
        ),
        (
            "alice stops it",
            Command::SetVmDesired {
                by: i.alice,
                vm: i.vm2,
                desired: Desired::Stopped,
                at: 9,
            },
            Box::new(done),
        ),
        (
            "heartbeat from unknown node",
            Command::Heartbeat {
                node: 9,
                capacity: Capacity::default(),
                at: 10,
            },
            err(|e| matches!(e, ApplyError::NotFound { .. })),
        ),
        (
            "heartbeat",
            Command::Heartbeat {
                node: 2,
                capacity: Capacity {
                    vcpus: 4,
                    memory_mib: 1024,
                    disk_gib: 100,
                },
                at: 10,
            },
            Box::new(done),
        ),
        (
            "delete a placed vm",
            Command::DeleteVm {
                by: i.alice,
                vm: i.vm2,
                at: 11,
            },
            Box::new(done),
        ),
        ("purge it", Command::PurgeVm { vm: i.vm2 }, Box::new(done)),
        (
            "the freed capacity takes bob's vm",
            Command::PlaceVm {
                vm: i.vmb,
                worker: 2,
                at: 12,
            },
            Box::new(done),
        ),
        (
            "token with a bad hash",
            Command::CreateApiToken {
                id: i.tok,
                account: i.alice,
                name: "ci".into(),
                hash: "zz".into(),
                at: 12,
                expires_at: 99,
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "token",
            Command::CreateApiToken {
                id: i.tok,
                account: i.alice,
                name: "ci".into(),
                hash: "a".repeat(64),
                at: 12,
                expires_at: 99,
            },
            Box::new(done),
        ),
        (
            "bob revokes alice's token",
            Command::RevokeApiToken {
                account: i.bob,
                id: i.tok,
            },
            err(|e| matches!(e, ApplyError::NotYours { .. })),
        ),
        (
            "alice revokes it",
            Command::RevokeApiToken {
                account: i.alice,
                id: i.tok,
            },
            Box::new(done),
        ),
        (
            "a token signing key",
            Command::AddTokenKey {
                kid: "k1".into(),
                pkcs8: hex::encode(&SIGNING.pkcs8),
                at: 12,
                if_none: true,
            },
            Box::new(done),
        ),
        (
            "a second first key is a no-op",
            Command::AddTokenKey {
                kid: "k2".into(),
                pkcs8: "not hex".into(),
                at: 12,
                if_none: true,
            },
            Box::new(done),
        ),
        (
            "a rotation with a key that is not one",
            Command::AddTokenKey {
                kid: "k3".into(),
                pkcs8: "00".into(),
                at: 12,
                if_none: false,
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "a scoped token",
            scoped_token(&i, vec!["app".into()], 12 + 3_600_000),
            Box::new(done),
        ),
        (
            "a token for a reserved name",
            scoped_token(&i, vec!["api".into()], 12 + 3_600_000),
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "a token for longer than 90 days",
            scoped_token(&i, Vec::new(), 12 + 91 * 24 * 3_600_000),
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "registration",
            Command::CreateRegistration {
                code: "abcdefgh12".into(),
                fingerprint: Fingerprint::of_key_blob(b"carol"),
                public_key: "ssh-ed25519 AAAA carol".into(),
                at: 13,
                expires_at: 20,
            },
            Box::new(done),
        ),
        (
            "registration for a bound key",
            Command::CreateRegistration {
                code: "zzzzzzzz12".into(),
                fingerprint: i.ka.clone(),
                public_key: "ssh-ed25519 AAAA".into(),
                at: 13,
                expires_at: 20,
            },
            err(|e| matches!(e, ApplyError::KeyTaken { .. })),
        ),
        (
            "complete after expiry",
            Command::CompleteRegistration {
                code: "abcdefgh12".into(),
                account: i.bob,
                at: 21,
            },
            err(|e| matches!(e, ApplyError::Expired { .. })),
        ),
        (
            "complete in time",
            Command::CompleteRegistration {
                code: "abcdefgh12".into(),
                account: i.bob,
                at: 15,
            },
            Box::new(done),
        ),
        (
            "dave's registration",
            Command::CreateRegistration {
                code: "dddddddd12".into(),
                fingerprint: Fingerprint::of_key_blob(b"dave"),
                public_key: "ssh-ed25519 AAAA dave".into(),
                at: 13,
                expires_at: 20,
            },
            Box::new(done),
        ),
        (
            "approved as a new account under a taken name: no account is left behind",
            Command::ApproveRegistration {
                code: "dddddddd12".into(),
                account: AccountId(Uuid::from_u128(0xda7e)),
                new_account: Some("alice".into()),
                at: 15,
            },
            err(|e| matches!(e, ApplyError::AccountNameTaken { .. })),
        ),
        (
            "approved as a new account after expiry",
            Command::ApproveRegistration {
                code: "dddddddd12".into(),
                account: AccountId(Uuid::from_u128(0xda7e)),
                new_account: Some("dave".into()),
                at: 21,
            },
            err(|e| matches!(e, ApplyError::Expired { .. })),
        ),
        (
            "approved as a new account",
            Command::ApproveRegistration {
                code: "dddddddd12".into(),
                account: AccountId(Uuid::from_u128(0xda7e)),
                new_account: Some("dave".into()),
                at: 15,
            },
            Box::new(done),
        ),
        (
            "TXT for an ACME challenge",
            Command::SetTxt {
                name: "_acme-challenge.app".into(),
                values: vec!["tok1".into(), "tok2".into()],
            },
            Box::new(done),
        ),
        (
            "TXT owner with a bad label",
            Command::SetTxt {
                name: "Bad Name".into(),
                values: vec!["x".into()],
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "TXT value too long",
            Command::SetTxt {
                name: "x".into(),
                values: vec!["v".repeat(256)],
            },
            err(|e| matches!(e, ApplyError::Invalid { .. })),
        ),
        (
            "complete twice",
            Command::CompleteRegistration {
                code: "abcdefgh12".into(),
                account: i.bob,
                at: 15,
            },
            err(|e| matches!(e, ApplyError::NotFound { .. })),
        ),
    ]
}

static SIGNING: std::sync::LazyLock<SigningKey> =
    std::sync::LazyLock::new(|| SigningKey::generate().unwrap());

fn scoped_token(i: &Ids, vms: Vec<String>, expires_at: u64) -> Command {
    Command::CreateToken {
        id: TokenId::random(),
        account: i.alice,
        label: "ci".into(),
        hash: "b".repeat(64),
        vms,
        read_only: true,
        at: 12,
        expires_at,
    }
}

#[test]
fn scripted_history() {
    let mut c = db();
    for (name, cmd, check) in history() {
        let before = digest(&c);
        let r = apply(&mut c, &cmd);
        assert!(check(&r), "{name}: got {r:?}");
        if r.is_err() {
            assert_eq!(before, digest(&c), "{name}: a refusal changed state");
        } else {
            // The JSON form round-trips (it is what the log stores).
            let json = serde_json::to_string(&cmd).unwrap();
            assert_eq!(
                serde_json::from_str::<Command>(&json).unwrap(),
                cmd,
                "{name}"
            );
        }
    }
    let i = ids();
    // Final state: alice owns app (.2) and app4 (.4); bob owns bobapp (.2); carol's key is bob's.
    let names: Vec<(String, String)> = rows::vms(&c)
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.public_ip.to_string()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("app".into(), "127.77.0.2".into()),
            ("app4".into(), "127.77.0.4".into()),
            ("bobapp".into(), "127.77.0.2".into()),
        ]
    );
    assert_eq!(
        rows::key_owner(&c, &Fingerprint::of_key_blob(b"carol")).unwrap(),
        Some(i.bob)
    );
    let deleted: i64 = c
        .query_row("SELECT COUNT(*) FROM deleted_vms", [], |r| r.get(0))
        .unwrap();
    assert_eq!(deleted, 0, "purged");
}

#[test]
fn replay_is_deterministic() {
    let (mut a, mut b) = (db(), db());
    for (_, cmd, _) in history() {
        let ra = apply(&mut a, &cmd);
        let rb = apply(&mut b, &cmd);
        assert_eq!(ra, rb);
    }
    assert_eq!(digest(&a), digest(&b));
}

#[test]
fn pool_exhaustion_is_per_owner() {
    let mut c = db();
    let i = ids();
    // 127.77.0.0/30: .0 network, .1 lobby, .3 broadcast: one address to hand out.
    for cmd in [
        init("127.77.0.0/30", 10),
        account(i.alice, "alice"),
        account(i.bob, "bob"),
    ] {
        assert!(apply(&mut c, &cmd).is_ok());
    }
    assert!(created("127.77.0.2")(&apply(
        &mut c,
        &vm(i.vm1, i.alice, "a1")
    )));
    let before = digest(&c);
    let r = apply(&mut c, &vm(i.vm2, i.alice, "a2"));
    assert!(matches!(r, Err(ApplyError::PoolExhausted { .. })), "{r:?}");
    assert_eq!(before, digest(&c));
    assert!(
        created("127.77.0.2")(&apply(&mut c, &vm(i.vmb, i.bob, "b1"))),
        "bob still gets one"
    );
}

/// Random creates and deletes for two owners: every create must get exactly the lowest address
/// the naive model (scan of everything in use) would give.
#[test]
fn allocation_matches_the_lowest_free_model() {
    let mut c = db();
    let i = ids();
    // 127.77.0.0/27 with the lobby at .1: addresses .2 ..= .30 (29 of them).
    for cmd in [
        init("127.77.0.0/27", 1000),
        account(i.alice, "alice"),
        account(i.bob, "bob"),
    ] {
        assert!(apply(&mut c, &cmd).is_ok());
    }
    let assignable: Vec<u32> = (2..=30)
        .map(|h| u32::from(Ipv4Addr::new(127, 77, 0, h)))
        .collect();
    let mut live: Vec<(VmId, AccountId, u32)> = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for step in 0..2000 {
        let owner = if rand() % 2 == 0 { i.alice } else { i.bob };
        let mine: Vec<u32> = live
            .iter()
            .filter(|(_, o, _)| *o == owner)
            .map(|x| x.2)
            .collect();
        if rand() % 3 == 0 && !mine.is_empty() {
            let victim = live
                .iter()
                .enumerate()
                .filter(|(_, (_, o, _))| *o == owner)
                .nth(rand() as usize % mine.len())
                .map(|(k, _)| k)
                .unwrap();
            let (vm, _, _) = live.remove(victim);
            let r = apply(
                &mut c,
                &Command::DeleteVm {
                    by: owner,
                    vm,
                    at: 1,
                },
            );
            assert!(r.is_ok(), "step {step}: {r:?}");
        } else {
            let expect = assignable.iter().find(|a| !mine.contains(a)).copied();
            let id = VmId(Uuid::from_u128(10_000 + step));
            let r = apply(&mut c, &vm(id, owner, &format!("s{step}")));
            match expect {
                Some(ip) => {
                    assert_eq!(
                        r,
                        Ok(Outcome::VmCreated {
                            id,
                            public_ip: Ipv4Addr::from(ip)
                        }),
                        "step {step}"
                    );
                    live.push((id, owner, ip));
                }
                None => assert!(
                    matches!(r, Err(ApplyError::PoolExhausted { .. })),
                    "step {step}: {r:?}"
                ),
            }
        }
    }
}

#[test]
fn first_key_claims_the_cluster_and_host_key_is_written_once() {
    let mut c = db();
    let i = ids();
    let claim = |id: AccountId, fp: &Fingerprint| Command::ClaimOwner {
        id,
        name: "owner".into(),
        fingerprint: fp.clone(),
        public_key: "ssh-ed25519 AAAA".into(),
        at: 5,
    };
    assert!(done(&apply(&mut c, &init("127.77.0.0/16", 3))));
    assert!(done(&apply(&mut c, &claim(i.alice, &i.ka))));
    assert!(done(&apply(&mut c, &claim(i.alice, &i.ka))), "a retry");
    let before = digest(&c);
    let r = apply(&mut c, &claim(i.bob, &i.kb));
    assert!(matches!(r, Err(ApplyError::OwnerClaimed)), "{r:?}");
    assert_eq!(before, digest(&c));
    assert_eq!(rows::key_owner(&c, &i.ka).unwrap(), Some(i.alice));
    assert_eq!(rows::keys_of(&c, i.alice).unwrap().len(), 1);

    let key = |k: &str| Command::SetSshHostKey {
        private_key: format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{k}\n"),
    };
    assert!(done(&apply(&mut c, &key("first"))));
    assert!(done(&apply(&mut c, &key("second"))));
    assert!(
        rows::meta(&c, rows::SSH_HOST_KEY)
            .unwrap()
            .unwrap()
            .contains("first")
    );
    let r = apply(
        &mut c,
        &Command::SetSshHostKey {
            private_key: "not a key".into(),
        },
    );
    assert!(matches!(r, Err(ApplyError::Invalid { .. })), "{r:?}");

    let ca = |tag: &str| Command::SetTlsLocalCa {
        material: TlsMaterial {
            ca_cert: format!("-----BEGIN CERTIFICATE-----\n{tag}\n"),
            chain: "-----BEGIN CERTIFICATE-----\n".into(),
            key: "-----BEGIN PRIVATE KEY-----\n".into(),
        },
    };
    assert!(done(&apply(&mut c, &ca("first"))));
    assert!(done(&apply(&mut c, &ca("second"))));
    let kept = rows::tls_local_ca(&c).unwrap().unwrap();
    assert!(kept.ca_cert.contains("first"), "the first CA stays");
    let bad = Command::SetTlsLocalCa {
        material: TlsMaterial {
            ca_cert: "x".into(),
            chain: String::new(),
            key: String::new(),
        },
    };
    assert!(matches!(
        apply(&mut c, &bad),
        Err(ApplyError::Invalid { .. })
    ));
}

/// A batch applied with one savepoint answers and ends exactly as its commands applied one by
/// one, whether or not some of them are refused (the history refuses about a third), and
/// records the same changes for the View.
#[test]
fn a_batch_ends_as_its_commands_one_by_one() {
    let cmds: Vec<Command> = history().into_iter().map(|(_, cmd, _)| cmd).collect();
    let single = db();
    let mut one_by_one = Applier::default();
    let want: Vec<String> = cmds
        .iter()
        .map(|cmd| format!("{:?}", one_by_one.apply(&single, cmd).unwrap()))
        .collect();
    let want_state = digest(&single);
    for size in [2, 3, 5, 8, cmds.len()] {
        let c = db();
        let mut batched = Applier::default();
        let mut got = Vec::new();
        for chunk in cmds.chunks(size) {
            got.extend(
                batched
                    .apply_batch(&c, chunk)
                    .unwrap()
                    .iter()
                    .map(|r| format!("{r:?}")),
            );
        }
        assert_eq!(got, want, "answers, batches of {size}");
        assert_eq!(digest(&c), want_state, "state, batches of {size}");
        assert_eq!(
            batched.touched, one_by_one.touched,
            "View changes, batches of {size}"
        );
    }
}

/// Every command of the history survives both of its forms: the JSON the admin socket and the
/// API take (`type` first, then the fields) and the binary one of the Raft stream and the log.
#[test]
fn every_command_round_trips_in_json_and_binary() {
    let i = ids();
    let mut cmds: Vec<Command> = history().into_iter().map(|(_, cmd, _)| cmd).collect();
    // The three the history leaves out.
    cmds.extend([
        Command::ClaimOwner {
            id: i.alice,
            name: "owner".into(),
            fingerprint: i.ka.clone(),
            public_key: "ssh-ed25519 AAAA".into(),
            at: 5,
        },
        Command::SetSshHostKey {
            private_key: "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n".into(),
        },
        Command::SetTlsLocalCa {
            material: TlsMaterial {
                ca_cert: "ca".into(),
                chain: "chain".into(),
                key: "key".into(),
            },
        },
    ]);
    let kinds: std::collections::BTreeSet<&str> = cmds.iter().map(Command::kind).collect();
    assert_eq!(
        kinds.len(),
        26,
        "the history holds every kind of command: {kinds:?}"
    );
    for cmd in &cmds {
        let json = serde_json::to_string(cmd).unwrap();
        assert!(
            json.starts_with(&format!("{{\"type\":\"{}\",", cmd.kind())),
            "{json}"
        );
        assert_eq!(&serde_json::from_str::<Command>(&json).unwrap(), cmd);
        let mut binary = Vec::new();
        boxd_controlplane::raft::codec::encode_into(cmd, &mut binary).unwrap();
        let back: Command = boxd_controlplane::raft::codec::decode(&binary).unwrap();
        assert_eq!(&back, cmd, "binary form of {json}");
    }
}

/// The JSON form is read with `type` anywhere in the object, and tells a caller what is wrong.
#[test]
fn command_json_says_what_is_wrong() {
    let vm = "00000000-0000-0000-0000-000000000001";
    let last = format!(r#"{{"vm":"{vm}","type":"purge_vm"}}"#);
    assert_eq!(
        serde_json::from_str::<Command>(&last).unwrap(),
        Command::PurgeVm {
            vm: VmId(Uuid::from_u128(1))
        }
    );
    // Fields on both sides of `type`, and inside another object read the same way.
    let split = r#"{"owner":"00000000-0000-0000-0000-00000000000a","name":"web","type":"create_vm",
        "id":"00000000-0000-0000-0000-000000000001","http_port":80,"at":4,
        "spec":{"vcpus":1,"memory_mib":512,"disk_gib":4,"image":"minimal"}}"#;
    let want = Command::CreateVm {
        id: VmId(Uuid::from_u128(1)),
        owner: ids().alice,
        name: "web".into(),
        spec: VmSpec::default(),
        http_port: 80,
        at: 4,
    };
    assert_eq!(VmSpec::default().image, "minimal");
    assert_eq!(serde_json::from_str::<Command>(split).unwrap(), want);
    let value: serde_json::Value = serde_json::from_str(split).unwrap();
    assert_eq!(serde_json::from_value::<Command>(value).unwrap(), want);
    // A ReportVm logged before `reason` existed.
    let old = format!(
        r#"{{"type":"report_vm","vm":"{vm}","worker":1,"observed":"running","private_ip":null,"at":3}}"#
    );
    assert!(matches!(
        serde_json::from_str::<Command>(&old).unwrap(),
        Command::ReportVm { reason: None, .. }
    ));
    for (bad, says) in [
        (format!(r#"{{"vm":"{vm}"}}"#), "missing field `type`"),
        (
            r#"{"type":"reboot_vm"}"#.to_owned(),
            "unknown variant `reboot_vm`",
        ),
        (
            r#"{"type":7}"#.to_owned(),
            "expected the command's name as a string",
        ),
        (r#"{"type":"purge_vm"}"#.to_owned(), "missing field `vm`"),
        (r#"[1,2]"#.to_owned(), "invalid type"),
    ] {
        match serde_json::from_str::<Command>(&bad) {
            Err(e) => assert!(e.to_string().contains(says), "{bad}: {e}"),
            Ok(cmd) => panic!("{bad} parsed as {cmd:?}"),
        }
    }
    // Unknown fields are ignored, as before.
    let extra = format!(r#"{{"type":"purge_vm","vm":"{vm}","extra":1}}"#);
    assert_eq!(
        serde_json::from_str::<Command>(&extra).unwrap(),
        Command::PurgeVm {
            vm: VmId(Uuid::from_u128(1))
        }
    );
}

/// Within a transaction the state machine hands what one applier remembers (cluster settings,
/// the account counters creates move) to the next. Applying through such a chain must answer
/// and end exactly as a fresh applier per command, which reads every row: creates for the same
/// owner back to back, deletes that free addresses for the next create to reuse, quota and
/// pool refusals in between.
#[test]
fn remembered_rows_match_the_tables() {
    let i = ids();
    let vid = |n: u128| VmId(Uuid::from_u128(2_000 + n));
    let mut cmds: Vec<Command> = history().into_iter().map(|(_, cmd, _)| cmd).collect();
    // After the history: a small pool and quota of its own for a new account, filled, emptied
    // in the middle and filled again.
    let dave = AccountId(Uuid::from_u128(13));
    cmds.push(Command::CreateAccount {
        id: dave,
        name: "dave".into(),
        max_vms: Some(4),
        at: 50,
    });
    // No refusal between the creates and the deletes: a refusal rolls back, and with it
    // whatever the applier remembered.
    for n in 0..4 {
        cmds.push(vm(vid(n), dave, &format!("d{n}")));
    }
    for n in [1, 2] {
        cmds.push(Command::DeleteVm {
            by: dave,
            vm: vid(n),
            at: 60,
        });
    }
    for n in 4..8 {
        cmds.push(vm(vid(n), dave, &format!("d{n}")));
    }
    cmds.push(vm(vid(20), i.alice, "after-all"));
    let fresh = db();
    let want: Vec<String> = cmds
        .iter()
        .map(|cmd| format!("{:?}", Applier::default().apply(&fresh, cmd).unwrap()))
        .collect();
    assert!(
        want.iter().any(|a| a.contains("QuotaExceeded")),
        "dave's quota must be reached: {want:?}"
    );
    for size in [1, 2, 3, 7, cmds.len()] {
        let c = db();
        let mut cache = Default::default();
        let mut got = Vec::new();
        for chunk in cmds.chunks(size) {
            let mut applier = Applier::with_cache(cache);
            got.extend(
                applier
                    .apply_batch(&c, chunk)
                    .unwrap()
                    .iter()
                    .map(|r| format!("{r:?}")),
            );
            cache = applier.into_parts().1;
        }
        assert_eq!(got, want, "answers, batches of {size}");
        assert_eq!(digest(&c), digest(&fresh), "state, batches of {size}");
    }
}

/// A batch of creates alone runs without a savepoint (a create checks everything before it
/// writes); every way a create can be refused, inside such a batch and behind creates that
/// succeed, must still answer and end as one by one — nothing of a refused create written.
#[test]
fn a_batch_of_creates_refuses_without_a_trace() {
    let i = ids();
    // A /29 pool: six assignable addresses, the lobby excluded, so the pool runs out.
    let carol = AccountId(Uuid::from_u128(12));
    let setup = [
        init("127.77.0.0/29", 3),
        account(i.alice, "alice"),
        account(i.bob, "bob"),
        Command::CreateAccount {
            id: carol,
            name: "carol".into(),
            max_vms: Some(10),
            at: 2,
        },
    ];
    let vid = |n: u128| VmId(Uuid::from_u128(1_000 + n));
    let creates = vec![
        vm(vid(1), i.alice, "web"),
        vm(vid(2), i.bob, "web"),     // name taken in this batch
        vm(vid(1), i.alice, "web"),   // the same create again: its answer
        vm(vid(1), i.alice, "other"), // the same id, another VM
        vm(vid(3), AccountId(Uuid::from_u128(99)), "lost"), // no such account
        vm(vid(4), i.alice, "Bad_Name"), // invalid name
        vm_with(vid(5), i.alice, "port", VmSpec::default(), 0), // port 0
        vm(vid(6), i.alice, "db"),
        vm(vid(7), i.alice, "cache"),
        vm(vid(8), i.alice, "queue"), // over alice's quota of 3
        vm(vid(9), i.bob, "b1"),
        vm(vid(10), i.bob, "b2"),
        vm(vid(11), i.bob, "b3"),
    ];
    // Carol's quota is above the five addresses the pool has for each owner.
    let mut creates = creates;
    creates.extend((0..6).map(|n| vm(vid(20 + n), carol, &format!("c{n}"))));
    let single = db();
    let mut one_by_one = Applier::default();
    for cmd in &setup {
        assert!(one_by_one.apply(&single, cmd).unwrap().is_ok());
    }
    let want: Vec<String> = creates
        .iter()
        .map(|cmd| format!("{:?}", one_by_one.apply(&single, cmd).unwrap()))
        .collect();
    for refusal in [
        "NameTaken",
        "IdConflict",
        "NotFound",
        "Invalid",
        "QuotaExceeded",
        "PoolExhausted",
    ] {
        assert!(
            want.iter()
                .any(|a| a.starts_with("Err") && a.contains(refusal)),
            "the batch must be refused with {refusal}: {want:?}"
        );
    }
    let c = db();
    let mut batched = Applier::default();
    for cmd in &setup {
        assert!(batched.apply(&c, cmd).unwrap().is_ok());
    }
    let got: Vec<String> = batched
        .apply_batch(&c, &creates)
        .unwrap()
        .iter()
        .map(|r| format!("{r:?}"))
        .collect();
    assert_eq!(got, want, "answers");
    assert_eq!(digest(&c), digest(&single), "state");
    assert_eq!(batched.touched, one_by_one.touched, "View changes");
}

/// The View takes a created VM's route from the create itself; it must be exactly what the
/// row reads back as. A VM changed after its create in the same batch is read back.
#[test]
fn a_created_route_is_the_row_read_back() {
    let i = ids();
    let c = db();
    let mut applier = Applier::default();
    let setup = [init("127.77.0.0/16", 10), account(i.alice, "alice")];
    applier.apply_batch(&c, &setup).unwrap();
    let create = vm_with(i.vm1, i.alice, "web", VmSpec::default(), 8080);
    let mut fresh = Applier::default();
    assert!(fresh.apply(&c, &create).unwrap().is_ok());
    let route = fresh
        .touched
        .created
        .get(&i.vm1)
        .expect("a create records its route");
    let row = rows::vm(&c, i.vm1).unwrap().unwrap();
    assert_eq!(*route, boxd_controlplane::VmRoute::from(&row));

    let mut changed = Applier::default();
    let cmds = [
        vm(i.vm2, i.alice, "db"),
        Command::DeleteVm {
            by: i.alice,
            vm: i.vm2,
            at: 9,
        },
    ];
    changed.apply_batch(&c, &cmds).unwrap();
    assert!(changed.touched.vms.contains(&i.vm2));
    assert!(
        changed.touched.created.is_empty(),
        "a VM deleted after its create is read back (and found gone)"
    );
}

/// Issue 25, finding 6: every unknown key that connects causes a registration, so the table is
/// bounded: expired links go when a new one comes, and past `MAX_REGISTRATIONS` the oldest
/// live ones make room. Replayed elsewhere, the same history leaves the same rows.
#[test]
fn registrations_are_bounded_oldest_first() {
    use boxd_controlplane::store::apply::MAX_REGISTRATIONS;
    let reg = |n: i64, at: u64| Command::CreateRegistration {
        code: format!("code{n:08}"),
        fingerprint: Fingerprint::of_key_blob(format!("stranger{n}").as_bytes()),
        public_key: "ssh-ed25519 AAAA stranger".into(),
        at,
        expires_at: at + 1_000_000,
    };
    let count = |c: &Connection| -> i64 {
        c.query_row("SELECT count(*) FROM registrations", [], |r| r.get(0))
            .unwrap()
    };
    let history: Vec<Command> = std::iter::once(init("127.77.0.0/16", 10))
        .chain((0..MAX_REGISTRATIONS + 3).map(|n| reg(n, 100 + n.unsigned_abs())))
        .collect();
    let mut c = db();
    let mut applier = Applier::default();
    for batch in history.chunks(1000) {
        for r in applier.apply_batch(&c, batch).unwrap() {
            assert!(r.is_ok(), "{r:?}");
        }
    }
    assert_eq!(count(&c), MAX_REGISTRATIONS);
    let oldest: String = c
        .query_row("SELECT min(code) FROM registrations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(oldest, "code00000003", "the three oldest made room");
    let again = db();
    let mut replay = Applier::default();
    for batch in history.chunks(1000) {
        replay.apply_batch(&again, batch).unwrap();
    }
    assert_eq!(digest(&c), digest(&again));
    // Once every link has expired, a new one finds the table empty of them.
    let late = reg(MAX_REGISTRATIONS + 10, 10_000_000);
    assert!(apply(&mut c, &late).is_ok());
    assert_eq!(count(&c), 1);
}

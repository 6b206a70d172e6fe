//! `LinkIdentity` as a pure function of (state, command): a person's first sign-in makes their
//! account, later ones (for other keys) join it; a used, unknown or expired code, or a
//! malformed identity, is refused with every table unchanged; replay gives the same state.

#![allow(clippy::unwrap_used, missing_docs)]

use boxd_controlplane::command::{ApplyError, Command};
use boxd_controlplane::model::{AccountId, Fingerprint};
use boxd_controlplane::store::apply::Applier;
use boxd_controlplane::store::{rows, schema};
use rusqlite::Connection;
use uuid::Uuid;

mod common;
use common::digest;

fn init() -> Command {
    Command::InitCluster {
        cluster_id: Uuid::from_u128(1),
        secret: "0123456789abcdef0123456789abcdef".into(),
        zone: "boxd.test".into(),
        lobby: "127.77.0.1".parse().unwrap(),
        public_pool: "127.77.0.0/16".parse().unwrap(),
        max_vms_per_account: 3,
        at: 1,
    }
}

fn key(n: u8) -> Fingerprint {
    Fingerprint::of_key_blob(&[n; 8])
}

fn register(n: u8, expires_at: u64) -> Command {
    Command::CreateRegistration {
        code: format!("{n:032x}"),
        fingerprint: key(n),
        public_key: format!("ssh-ed25519 AAAA key{n}"),
        at: 10,
        expires_at,
    }
}

fn link(n: u8, subject: &str, account: u128, name: &str, at: u64) -> Command {
    Command::LinkIdentity {
        code: format!("{n:032x}"),
        issuer: "https://id.example".into(),
        subject: subject.into(),
        email: Some(format!("{subject}@example.test")),
        account: AccountId(Uuid::from_u128(account)),
        name: name.into(),
        at,
    }
}

#[test]
fn a_person_gets_one_account_for_all_their_keys() {
    let history = [
        init(),
        register(1, 1000),
        register(2, 1000),
        register(3, 1000),
        register(4, 50),
        // Someone already took the name "alice".
        Command::CreateAccount {
            id: AccountId(Uuid::from_u128(9)),
            name: "alice".into(),
            max_vms: None,
            at: 5,
        },
    ];
    let c = Connection::open_in_memory().unwrap();
    schema::migrate(&c).unwrap();
    let mut applier = Applier::default();
    for r in applier.apply_batch(&c, &history).unwrap() {
        assert!(r.is_ok(), "{r:?}");
    }
    let owner = |c: &Connection, n: u8| rows::key_owner(c, &key(n)).unwrap();

    // First sign-in: a new account, under another name since "alice" is taken.
    let r = applier
        .apply(&c, &link(1, "alice", 100, "alice", 20))
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    let alice = AccountId(Uuid::from_u128(100));
    assert_eq!(owner(&c, 1), Some(alice));
    assert_eq!(
        rows::account(&c, alice).unwrap().unwrap().name,
        format!("alice-{}", &format!("{:032x}", 1)[..6])
    );
    // Second key, same person: the same account (the proposed id is not used).
    let r = applier
        .apply(&c, &link(2, "alice", 101, "alice", 21))
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(owner(&c, 2), Some(alice));
    assert!(
        rows::account(&c, AccountId(Uuid::from_u128(101)))
            .unwrap()
            .is_none()
    );

    // Refused, with nothing changed: a used code (a replayed callback), an unknown one, an
    // expired one, a malformed identity.
    let before = digest(&c);
    let refused = [
        (link(1, "bob", 102, "bob", 22), "used"),
        (link(7, "bob", 102, "bob", 22), "unknown"),
        (link(4, "bob", 102, "bob", 60), "expired"),
        (link(3, "", 102, "bob", 22), "empty subject"),
        (link(3, &"s".repeat(256), 102, "bob", 22), "long subject"),
    ];
    for (cmd, why) in refused {
        let r = applier.apply(&c, &cmd).unwrap();
        assert!(r.is_err(), "{why}: {r:?}");
        assert_eq!(digest(&c), before, "{why} changed nothing");
    }
    let r = applier.apply(&c, &link(4, "bob", 102, "bob", 60)).unwrap();
    assert!(matches!(r, Err(ApplyError::Expired { .. })), "{r:?}");

    // Another person: their own account.
    let r = applier.apply(&c, &link(3, "bob", 102, "bob", 23)).unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(owner(&c, 3), Some(AccountId(Uuid::from_u128(102))));

    // Replayed on a fresh database, the same history gives the same tables.
    let again = Connection::open_in_memory().unwrap();
    schema::migrate(&again).unwrap();
    let mut replay = Applier::default();
    replay.apply_batch(&again, &history).unwrap();
    for cmd in [
        link(1, "alice", 100, "alice", 20),
        link(2, "alice", 101, "alice", 21),
        link(1, "bob", 102, "bob", 22),
        link(3, "bob", 102, "bob", 23),
    ] {
        let _ = replay.apply(&again, &cmd).unwrap();
    }
    assert_eq!(digest(&c), digest(&again));
}

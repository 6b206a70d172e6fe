//! The SQLite state machine under openraft's interface: applied state is readable at once
//! (even before the deferred SQLite commit), a snapshot holds everything applied, installing it
//! elsewhere reproduces the replica and its View, and a reopened state machine resumes at the
//! index it had applied.

#![allow(clippy::unwrap_used, missing_docs)]

use boxd_controlplane::command::{Batch, Command, Outcome};
use boxd_controlplane::model::{AccountId, TokenId, VmId, VmSpec};
use boxd_controlplane::raft::Entry;
use boxd_controlplane::raft::state_machine::StateMachine;
use boxd_controlplane::tokens::SigningKey;
use boxd_controlplane::view::ViewHandle;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftSnapshotBuilder};
use uuid::Uuid;

fn entry(index: u64, cmds: Vec<Command>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Batch(cmds)),
    }
}

fn history(owner: AccountId, vm: VmId) -> Vec<Entry> {
    vec![
        entry(
            1,
            vec![
                Command::InitCluster {
                    cluster_id: Uuid::from_u128(1),
                    secret: "ab".repeat(16),
                    zone: "boxd.test".into(),
                    lobby: "127.77.0.1".parse().unwrap(),
                    public_pool: "127.77.0.0/16".parse().unwrap(),
                    max_vms_per_account: 5,
                    at: 1,
                },
                Command::CreateAccount {
                    id: owner,
                    name: "alice".into(),
                    max_vms: None,
                    at: 1,
                },
            ],
        ),
        entry(
            2,
            vec![
                Command::CreateVm {
                    id: vm,
                    owner,
                    name: "web".into(),
                    spec: VmSpec::default(),
                    http_port: 80,
                    at: 2,
                },
                // Refused (name taken) without disturbing its neighbours.
                Command::CreateVm {
                    id: VmId::random(),
                    owner,
                    name: "web".into(),
                    spec: VmSpec::default(),
                    http_port: 80,
                    at: 2,
                },
            ],
        ),
    ]
}

#[tokio::test]
async fn applied_state_is_visible_snapshotted_installed_and_resumed() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (owner, vm) = (AccountId::random(), VmId::random());
    let view_a = ViewHandle::new();
    let mut sm = StateMachine::open(a.path(), view_a.clone()).unwrap();
    let answers = sm.apply(history(owner, vm)).await.unwrap();
    assert_eq!(answers[0], vec![Ok(Outcome::Done), Ok(Outcome::Done)]);
    assert!(matches!(answers[1][0], Ok(Outcome::VmCreated { .. })));
    assert!(answers[1][1].is_err(), "{:?}", answers[1][1]);

    // Readable at once through the replica's reader, and published in the View.
    let vms = sm.reader().vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(view_a.current().vm_by_host("web.boxd.test").unwrap().id, vm);
    assert_eq!(view_a.current().applied(), 2);

    // A snapshot holds everything applied.
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));

    // Installed on another node it reproduces the replica and the View.
    let view_b = ViewHandle::new();
    let mut other = StateMachine::open(b.path(), view_b.clone()).unwrap();
    let mut rx = other.begin_receiving_snapshot().await.unwrap();
    let mut data = *snap.snapshot;
    tokio::io::copy(&mut data, &mut *rx).await.unwrap();
    other.install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(other.reader().vms().await.unwrap(), vms);
    assert_eq!(view_b.current().vm_by_host("WEB.boxd.test").unwrap().id, vm);
    let (applied, _) = other.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));

    // Reopened, the first state machine resumes where it was.
    drop(sm);
    let mut sm = StateMachine::open(a.path(), ViewHandle::new()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));
    assert_eq!(sm.reader().vms().await.unwrap(), vms);
}

/// openraft builds snapshots in a task of its own while the state machine may be installing a
/// leader's: neither may remove the other's files (the install's once vanished before it was
/// restored, which stopped the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_while_a_leaders_is_installed_breaks_neither() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (owner, vm) = (AccountId::random(), VmId::random());
    let mut leader = StateMachine::open(a.path(), ViewHandle::new()).unwrap();
    leader.apply(history(owner, vm)).await.unwrap();
    leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let mut node = StateMachine::open(b.path(), ViewHandle::new()).unwrap();
    node.apply(history(owner, vm)).await.unwrap();
    for round in 0..30 {
        let snap = leader.get_current_snapshot().await.unwrap().unwrap();
        let mut rx = node.begin_receiving_snapshot().await.unwrap();
        let mut data = *snap.snapshot;
        tokio::io::copy(&mut data, &mut *rx).await.unwrap();
        let mut builder = node.get_snapshot_builder().await;
        let build = tokio::spawn(async move { builder.build_snapshot().await.map(|s| s.meta) });
        let installed = node.install_snapshot(&snap.meta, rx).await;
        let built = build.await.unwrap();
        installed.unwrap_or_else(|e| panic!("round {round}: install: {e}"));
        built.unwrap_or_else(|e| panic!("round {round}: build: {e}"));
        let current = node.get_current_snapshot().await.unwrap();
        assert!(current.is_some(), "round {round}: no current snapshot");
        assert_eq!(node.reader().vms().await.unwrap().len(), 1);
    }
}

/// A storage error in the middle of an apply stops the state machine, and nothing of the open
/// transaction may reach the database afterwards: not the commands that went before the error
/// in the same apply, whose `last_applied` was never written (the log re-applies them at the
/// next start). Before, the state thread's idle commit wrote them out 5 ms later.
#[tokio::test]
async fn a_storage_error_leaves_nothing_half_applied() {
    let dir = tempfile::tempdir().unwrap();
    let owner = AccountId::random();
    let mut sm = StateMachine::open(dir.path(), ViewHandle::new()).unwrap();
    let setup = history(owner, VmId::random()).remove(0);
    sm.apply(vec![setup]).await.unwrap();
    // Let the idle commit end the open transaction, then put a row behind apply's back at the
    // address the owner's second VM will get, so that its insert fails as a bug in apply would
    // make it fail (UNIQUE (owner, public_ip)).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let state = dir.path().join("state.db");
    let side = rusqlite::Connection::open(&state).unwrap();
    side.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    side.execute(
        "INSERT INTO vms (id, name, owner, vcpus, memory_mib, disk_gib, image, desired, observed,
             worker, private_ip, public_ip, http_port, created_at, updated_at)
         VALUES (?1, 'planted', ?2, 1, 512, 1, 'debian', 'running', 'pending', NULL, NULL, ?3,
             80, 1, 1)",
        rusqlite::params![
            VmId::random().to_string(),
            owner.to_string(),
            u32::from("127.77.0.3".parse::<std::net::Ipv4Addr>().unwrap())
        ],
    )
    .unwrap();
    drop(side);
    let create = |name: &str| Command::CreateVm {
        id: VmId::random(),
        owner,
        name: name.into(),
        spec: VmSpec::default(),
        http_port: 80,
        at: 3,
    };
    let failed = sm
        .apply(vec![
            entry(2, vec![create("one")]),
            entry(3, vec![create("two"), create("three")]),
        ])
        .await;
    assert!(failed.is_err(), "the planted row must make the apply fail");
    // Long enough for the state thread's idle commit (5 ms) to have run.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let look = rusqlite::Connection::open(&state).unwrap();
    let names: Vec<String> = look
        .prepare("SELECT name FROM vms ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(names, ["planted"], "nothing of the failed apply is stored");
    let applied: String = look
        .query_row(
            "SELECT value FROM meta WHERE key = 'last_applied'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(applied.contains("\"index\":1"), "{applied}");
}

/// Tokens and the keys that sign them reach the View as they are applied (every proxy checks
/// tokens there), revocations too, and a View rebuilt from the tables (a reopened replica)
/// holds the same.
#[tokio::test]
async fn tokens_and_their_keys_reach_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, vm) = (AccountId::random(), VmId::random());
    let view = ViewHandle::new();
    let mut sm = StateMachine::open(dir.path(), view.clone()).unwrap();
    sm.apply(history(owner, vm)).await.unwrap();
    let key = SigningKey::generate().unwrap();
    let (kept, revoked) = (TokenId::random(), TokenId::random());
    let token = |id: TokenId| Command::CreateToken {
        id,
        account: owner,
        label: "ci".into(),
        hash: format!("{:064x}", id.0.as_u128()),
        vms: vec!["web".into()],
        read_only: true,
        at: 3,
        expires_at: 3 + 60_000,
    };
    let answers = sm
        .apply(vec![
            entry(
                3,
                vec![
                    Command::AddTokenKey {
                        kid: key.kid.clone(),
                        pkcs8: hex::encode(&key.pkcs8),
                        at: 3,
                        if_none: true,
                    },
                    token(kept),
                    token(revoked),
                ],
            ),
            entry(
                4,
                vec![Command::RevokeApiToken {
                    account: owner,
                    id: revoked,
                }],
            ),
        ])
        .await
        .unwrap();
    assert!(answers.iter().flatten().all(Result::is_ok), "{answers:?}");
    let check = |v: &boxd_controlplane::view::View| {
        assert!(v.token_live(kept, owner));
        assert!(
            !v.token_live(kept, AccountId::random()),
            "another account's"
        );
        assert!(!v.token_live(revoked, owner), "revoked");
        assert_eq!(
            v.token_key(&key.kid),
            Some(key.public().unwrap().as_slice())
        );
        assert_eq!(v.token_keys().len(), 1);
    };
    check(&view.current());
    drop(sm);
    let reopened = ViewHandle::new();
    let _sm = StateMachine::open(dir.path(), reopened.clone()).unwrap();
    check(&reopened.current());
}

//! The operations' own decisions (input checks, refusals, error kinds, registration limits)
//! against an in-memory backend that records what would be written. The real backend and the
//! lobby are covered end to end in tests/tests/journey.rs and lobby tests.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use boxd_model::command::{ApplyError, Command, Outcome};
use boxd_model::model::{
    Account, AccountId, ApiToken, Capacity, Fingerprint, Millis, Node, Registration, SshKey, Vm,
    VmId,
};
use boxd_model::tokens::SigningKey;
use boxd_model::view::ViewHandle;

use crate::{
    Approver, Backend, BoxFuture, Caller, ErrorKind, LinkTo, NewVm, OpError, Operations, Progress,
};

/// Answers reads from fixed data; each write is recorded and answered by `refuse`, if set.
#[derive(Default)]
struct Memory {
    workers: Vec<Node>,
    accounts: Vec<Account>,
    signing: Option<SigningKey>,
    writes: Mutex<Vec<Command>>,
    refuse: Option<ApplyError>,
    registration: Mutex<Option<Registration>>,
}

impl Memory {
    fn written(&self) -> usize {
        self.writes.lock().expect("lock").len()
    }
}

impl Backend for Memory {
    fn write(&self, cmd: Command) -> BoxFuture<'_, Result<Outcome, OpError>> {
        if let Command::CreateRegistration {
            code,
            fingerprint,
            public_key,
            at,
            expires_at,
        } = &cmd
        {
            *self.registration.lock().expect("lock") = Some(Registration {
                code: code.clone(),
                fingerprint: fingerprint.clone(),
                public_key: public_key.clone(),
                created_at: *at,
                expires_at: *expires_at,
            });
        }
        self.writes.lock().expect("lock").push(cmd);
        let r = match &self.refuse {
            Some(e) => Err(OpError::from(e.clone())),
            None => Ok(Outcome::Done),
        };
        Box::pin(async move { r })
    }
    fn vms_of(&self, _: AccountId) -> BoxFuture<'_, Result<Vec<Vm>, OpError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn keys_of(&self, _: AccountId) -> BoxFuture<'_, Result<Vec<SshKey>, OpError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn registration_of(
        &self,
        _: Fingerprint,
    ) -> BoxFuture<'_, Result<Option<Registration>, OpError>> {
        let r = self.registration.lock().expect("lock").clone();
        Box::pin(async move { Ok(r) })
    }
    fn registration(&self, code: String) -> BoxFuture<'_, Result<Option<Registration>, OpError>> {
        let r = self.registration.lock().expect("lock").clone();
        Box::pin(async move { Ok(r.filter(|r| r.code == code)) })
    }
    fn registrations(
        &self,
        now: Millis,
        _: u32,
    ) -> BoxFuture<'_, Result<Vec<Registration>, OpError>> {
        let r = self.registration.lock().expect("lock").clone();
        Box::pin(async move { Ok(r.into_iter().filter(|r| r.expires_at > now).collect()) })
    }
    fn tokens_of(&self, _: AccountId) -> BoxFuture<'_, Result<Vec<ApiToken>, OpError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn signing_key(&self) -> BoxFuture<'_, Result<Option<SigningKey>, OpError>> {
        let k = self.signing.clone();
        Box::pin(async move { Ok(k) })
    }
    fn account(&self, id: AccountId) -> BoxFuture<'_, Result<Option<Account>, OpError>> {
        let a = self.accounts.iter().find(|a| a.id == id).cloned();
        Box::pin(async move { Ok(a) })
    }
    fn account_named(&self, name: String) -> BoxFuture<'_, Result<Option<Account>, OpError>> {
        let a = self.accounts.iter().find(|a| a.name == name).cloned();
        Box::pin(async move { Ok(a) })
    }
    fn events_of(&self, _: VmId) -> BoxFuture<'_, Result<Vec<(Millis, String)>, OpError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn workers(&self) -> BoxFuture<'_, Result<Vec<Node>, OpError>> {
        let w = self.workers.clone();
        Box::pin(async move { Ok(w) })
    }
    fn now(&self) -> Millis {
        1_000_000
    }
}

fn ops(m: Memory) -> (Operations, Arc<Memory>) {
    let m = Arc::new(m);
    let o = Operations::new(m.clone(), ViewHandle::new(), Default::default());
    (o, m)
}

fn caller() -> Caller {
    Caller::key(AccountId::random(), Fingerprint::of_key_blob(b"k"))
}

fn worker(vcpus: u32) -> Node {
    Node {
        id: 1,
        uuid: uuid::Uuid::nil(),
        name: "w1".into(),
        roles: Default::default(),
        raft_addr: String::new(),
        capacity: Capacity {
            vcpus,
            memory_mib: 4096,
            disk_gib: 100,
        },
        used: Capacity::default(),
        last_heartbeat: 0,
        joined_at: 0,
    }
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() {
    let (o, m) = ops(Memory {
        workers: vec![worker(2)],
        ..Memory::default()
    });
    let c = caller();
    let p = Progress::default();
    let bad_name = NewVm {
        name: Some("My App".into()),
        ..NewVm::default()
    };
    let e = o.create(&c, bad_name, &p).await.expect_err("bad name");
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(e.message.contains("is not valid"), "{e}");
    let too_big = NewVm {
        cpus: Some(8),
        ..NewVm::default()
    };
    let e = o.create(&c, too_big, &p).await.expect_err("too big");
    assert_eq!(e.kind, ErrorKind::Exhausted);
    assert!(e.message.contains("the largest offers 2"), "{e}");
    let e = o
        .add_key(&c, b"# only a comment\n\n")
        .await
        .expect_err("no key");
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(e.message.starts_with("no key on stdin"), "{e}");
    let e = o.add_key(&c, &[0xff, 0xfe]).await.expect_err("not text");
    assert!(e.message.contains("not text"), "{e}");
    let e = o
        .remove_key(&c, "MD5:aa")
        .await
        .expect_err("not a fingerprint");
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert_eq!(m.written(), 0, "nothing reached the log");
}

#[tokio::test]
async fn removing_a_key_that_is_not_yours_reads_as_missing() {
    let (o, m) = ops(Memory {
        refuse: Some(ApplyError::NotYours {
            what: "key".into(),
            id: "x".into(),
        }),
        ..Memory::default()
    });
    let fp = Fingerprint::of_key_blob(b"someone else's");
    let e = o
        .remove_key(&caller(), fp.as_str())
        .await
        .expect_err("not ours");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(
        e.message,
        format!("no key {fp} on this account: see `keys`")
    );
    assert_eq!(m.written(), 1);
}

#[tokio::test]
async fn registration_links_are_reused_and_limited_per_address() {
    let (o, m) = ops(Memory::default());
    let fp = Fingerprint::of_key_blob(b"stranger");
    let peer: IpAddr = "192.0.2.7".parse().expect("ip");
    let first = o
        .registration_link(&fp, "ssh-ed25519 AAAA", peer)
        .await
        .expect("a link");
    assert!(
        first.starts_with("https://boxd.test:8443/register/"),
        "{first}"
    );
    let again = o
        .registration_link(&fp, "ssh-ed25519 AAAA", peer)
        .await
        .expect("the same link");
    assert_eq!(first, again, "a live link is reused");
    assert_eq!(m.written(), 1);
    // Different keys from one address spend its allowance.
    for i in 1..crate::registrations::PER_ADDRESS {
        let other = Fingerprint::of_key_blob(format!("k{i}").as_bytes());
        *m.registration.lock().expect("lock") = None;
        o.registration_link(&other, "ssh-ed25519 AAAA", peer)
            .await
            .expect("within the allowance");
    }
    *m.registration.lock().expect("lock") = None;
    let e = o
        .registration_link(&fp, "ssh-ed25519 AAAA", peer)
        .await
        .expect_err("allowance spent");
    assert_eq!(e.kind, ErrorKind::Exhausted);
    assert_eq!(
        m.written(),
        crate::registrations::PER_ADDRESS as usize,
        "the refused link cost no write"
    );
}

fn account(id: AccountId, name: &str, owner: bool) -> Account {
    Account {
        id,
        name: name.into(),
        max_vms: 3,
        vm_count: 0,
        created_at: 0,
        owner,
    }
}

#[tokio::test]
async fn only_the_owner_approves_and_a_refusal_writes_nothing() {
    let (owner, other) = (caller(), caller());
    let code = "0123456789abcdef0123456789abcdef";
    let (o, m) = ops(Memory {
        accounts: vec![
            account(owner.account, "owner", true),
            account(other.account, "bob", false),
        ],
        registration: Mutex::new(Some(Registration {
            code: code.into(),
            fingerprint: Fingerprint::of_key_blob(b"waiting"),
            public_key: "ssh-ed25519 AAAA w@x".into(),
            created_at: 0,
            // Memory's clock reads 1,000,000.
            expires_at: 2_000_000,
        })),
        ..Memory::default()
    });
    let by = |c| Approver::Account(c);
    let e = o
        .approve(by(&other), code, LinkTo::NewAccount(None))
        .await
        .expect_err("not the owner");
    assert_eq!(e.kind, ErrorKind::Denied);
    let e = o.pending_keys(by(&other)).await.expect_err("not the owner");
    assert_eq!(e.kind, ErrorKind::Denied);
    for bad in [
        "",
        "../etc",
        "0123456789ABCDEF0123456789ABCDEF",
        &"a".repeat(33),
    ] {
        let e = o.pending_key(bad).await.expect_err("not a code");
        assert_eq!(e.kind, ErrorKind::NotFound, "{bad:?}");
    }
    let e = o
        .approve(by(&owner), code, LinkTo::Account("nobody".into()))
        .await
        .expect_err("no such account");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(m.written(), 0, "no refusal reached the log");
    let k = o.pending_key(code).await.expect("the page's key");
    assert_eq!((k.key_type.as_str(), k.expired), ("ssh-ed25519", false));
    assert_eq!(o.pending_keys(by(&owner)).await.expect("listed").len(), 1);
    let a = o
        .approve(by(&owner), code, LinkTo::Account("bob".into()))
        .await
        .expect("approved into bob's account");
    assert_eq!((a.account.as_str(), a.new_account), ("bob", false));
    let a = o
        .approve(Approver::Operator, code, LinkTo::NewAccount(None))
        .await
        .expect("the operator approves");
    assert_eq!(a.account, "user-01234567");
    let written = m.writes.lock().expect("lock");
    assert!(
        matches!(
            &written[..],
            [
                Command::ApproveRegistration { account, new_account: None, .. },
                Command::ApproveRegistration { new_account: Some(n), .. },
            ] if *account == other.account && n == "user-01234567"
        ),
        "{written:?}"
    );
}

#[tokio::test]
async fn an_expired_link_is_shown_as_expired_and_not_approved() {
    let owner = caller();
    let code = "ffffffffffffffffffffffffffffffff";
    let (o, m) = ops(Memory {
        accounts: vec![account(owner.account, "owner", true)],
        registration: Mutex::new(Some(Registration {
            code: code.into(),
            fingerprint: Fingerprint::of_key_blob(b"late"),
            public_key: "ssh-ed25519 AAAA".into(),
            created_at: 0,
            expires_at: 999_999,
        })),
        ..Memory::default()
    });
    assert!(o.pending_key(code).await.expect("shown").expired);
    let e = o
        .approve(Approver::Account(&owner), code, LinkTo::NewAccount(None))
        .await
        .expect_err("expired");
    assert_eq!(e.kind, ErrorKind::Refused);
    assert!(e.message.contains("expired"), "{e}");
    assert!(
        o.pending_keys(Approver::Operator)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(m.written(), 0);
}

#[tokio::test]
async fn a_token_can_only_make_narrower_shorter_tokens() {
    use boxd_model::tokens::{Scope, Verified};
    let key = SigningKey::generate().expect("key");
    let (o, m) = ops(Memory {
        signing: Some(key.clone()),
        ..Memory::default()
    });
    // Memory's clock reads 1,000,000 ms; the parent token has 10 minutes left.
    let parent = Caller::token(Verified {
        account: AccountId::random(),
        id: boxd_model::model::TokenId::random(),
        expires_at: 1_000_000 + 600_000,
        scope: Scope {
            vms: Vec::new(),
            read_only: true,
        },
    });
    let ask = |ttl: Option<u64>, read_only: bool| crate::NewToken {
        ttl_ms: ttl,
        read_only,
        ..crate::NewToken::default()
    };
    let e = o
        .create_token(&parent, ask(None, false))
        .await
        .expect_err("wider: read-write");
    assert_eq!(e.kind, ErrorKind::Denied);
    let e = o
        .create_token(&parent, ask(Some(3_600_000), true))
        .await
        .expect_err("longer");
    assert_eq!(e.kind, ErrorKind::Denied);
    let e = o.revoke_token(&parent, "x").await.expect_err("read-only");
    assert_eq!(e.kind, ErrorKind::Denied);
    let e = o
        .add_key(&parent, b"ssh-ed25519 AAAA")
        .await
        .expect_err("keys over SSH");
    assert_eq!(e.kind, ErrorKind::Denied);
    let e = o
        .create(&parent, NewVm::default(), &Progress::default())
        .await
        .expect_err("read-only");
    assert_eq!(e.kind, ErrorKind::Denied);
    assert_eq!(m.written(), 0, "no refusal reached the log");
    // Within scope and lifetime: the default is what the parent has left.
    let t = o
        .create_token(&parent, ask(None, true))
        .await
        .expect("narrower");
    assert_eq!(t.info.expires_at, 1_600_000);
    assert!(t.info.read_only);
    let public = key.public().expect("public");
    let v = boxd_model::tokens::verify(
        &t.token,
        "boxd.test",
        1_000_000,
        |_| Some(public.clone()),
        |_| true,
    )
    .expect("verifies");
    assert_eq!((v.account, v.id), (parent.account, t.info.id));
    assert_eq!(m.written(), 1);
}

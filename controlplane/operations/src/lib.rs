//! Every user operation, once: create, list, show, delete, start, stop and restart a VM; list,
//! add and remove keys; who am I; the first key's claim, registration links and their
//! approval. Each runs
//! against the control plane through a [`Backend`] (log writes, replica reads) and the View
//! (waiting for a VM's state), and fails with one [`OpError`] that says what to do.
//!
//! Front ends are thin: the SSH lobby (boxd-dataplane `ssh::lobby`) parses a command line,
//! calls one operation and prints the answer; the gRPC API does the same with protobuf. No
//! operation is implemented in a front end. See DESIGN.md.

mod approvals;
pub mod backend;
pub mod capacity;
mod error;
mod identity;
mod keys;
mod liveness;
pub use self::liveness::mark_unknown;
pub mod registrations;
mod signin;
mod tokens;
mod vms;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boxd_model::model::{AccountId, Fingerprint};
use boxd_model::tokens::{Scope, Verified};
use boxd_model::view::ViewHandle;
use tokio::sync::mpsc;

pub use self::approvals::{Approved, Approver, LinkTo, PendingKey, is_code};
pub use self::backend::{Backend, BoxFuture};
pub use self::error::{ErrorKind, OpError};
pub use self::identity::REGISTRATION_TTL_MS;
pub use self::keys::{Whoami, parse_public_key};
use self::registrations::RegistrationLimits;
pub use self::signin::{SignedIn, account_name};
pub use self::tokens::{DEFAULT_TTL_MS, Issued, NewToken, parse_duration};
pub use self::vms::{NewVm, Shown};

/// Addresses the operations print and how long they wait.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Port users reach SSH on (in `ssh -p`).
    pub ssh_port: u16,
    /// Port users reach HTTPS on; `None` when no proxy serves HTTPS.
    pub https_port: Option<u16>,
    /// How long `create`, `start` and `restart` wait for the VM to become reachable.
    pub ready_timeout: Duration,
    /// The name of the OpenID provider people sign in with to link a key (`[identity]`), or
    /// `None`: the owner approves keys, and the first key to connect owns the cluster.
    pub sign_in: Option<String>,
    /// How long a worker may be silent (no heartbeat) and still count as up; past it, its
    /// VMs show as [`Observed::Unknown`](boxd_model::model::Observed::Unknown).
    pub liveness: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ssh_port: 2222,
            https_port: Some(8443),
            ready_timeout: Duration::from_secs(120),
            sign_in: None,
            liveness: Duration::from_secs(30),
        }
    }
}

/// Who runs an operation: an account, and what proved it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Account.
    pub account: AccountId,
    /// What they authenticated with.
    pub credential: Credential,
}

/// What a caller proved.
#[derive(Clone, Debug)]
pub enum Credential {
    /// One of the account's SSH keys: everything the account may do.
    Key(Fingerprint),
    /// An API token: what its scope allows, until it expires.
    Token(Verified),
}

impl Caller {
    /// A caller authenticated by the account's key `fp`.
    pub fn key(account: AccountId, fp: Fingerprint) -> Self {
        Self {
            account,
            credential: Credential::Key(fp),
        }
    }

    /// A caller authenticated by a checked token.
    pub fn token(t: Verified) -> Self {
        Self {
            account: t.account,
            credential: Credential::Token(t),
        }
    }

    /// The key they authenticated with, if it was a key.
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        match &self.credential {
            Credential::Key(fp) => Some(fp),
            Credential::Token(_) => None,
        }
    }

    /// What they may do: everything with a key, the token's scope with a token.
    pub fn scope(&self) -> Scope {
        match &self.credential {
            Credential::Key(_) => Scope::default(),
            Credential::Token(t) => t.scope.clone(),
        }
    }

    /// Refused unless the caller may read VM `name`.
    fn may_read(&self, name: &str) -> Result<(), OpError> {
        let scope = self.scope();
        if scope.covers(name) {
            return Ok(());
        }
        Err(OpError::new(
            ErrorKind::Denied,
            format!(
                "this token is limited to the VMs {}: {name} is not one of them",
                scope.vms.join(", ")
            ),
        ))
    }

    /// Refused unless the caller may change VM `name` (`None`: create a new one).
    fn may_write(&self, name: Option<&str>) -> Result<(), OpError> {
        let scope = self.scope();
        if scope.read_only {
            return Err(OpError::new(
                ErrorKind::Denied,
                "this token is read-only: use one made without --read-only",
            ));
        }
        match name {
            Some(n) => self.may_read(n),
            None if !scope.vms.is_empty() => Err(OpError::new(
                ErrorKind::Denied,
                "this token is limited to some VMs and cannot create new ones",
            )),
            None => Ok(()),
        }
    }
}

/// Progress lines while an operation waits (the lobby prints them on stderr).
#[derive(Clone, Debug, Default)]
pub struct Progress(Option<mpsc::UnboundedSender<String>>);

impl Progress {
    /// Progress that goes to `tx`.
    pub fn to(tx: mpsc::UnboundedSender<String>) -> Self {
        Self(Some(tx))
    }

    fn line(&self, s: String) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(s);
        }
    }
}

/// The operations, over one backend and View. One per process, shared by every front end and
/// shard (it holds the registration-link limits).
pub struct Operations {
    backend: Arc<dyn Backend>,
    view: Arc<ViewHandle>,
    settings: Settings,
    registrations: Mutex<RegistrationLimits>,
}

impl Operations {
    /// Operations over `backend` and `view`.
    pub fn new(backend: Arc<dyn Backend>, view: Arc<ViewHandle>, settings: Settings) -> Self {
        Self {
            backend,
            view,
            settings,
            registrations: Mutex::new(RegistrationLimits::default()),
        }
    }

    /// The View.
    pub fn view(&self) -> &Arc<ViewHandle> {
        &self.view
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The zone, for messages.
    pub fn zone(&self) -> String {
        self.view.current().zone().unwrap_or("boxd.test").to_owned()
    }

    /// The first lobby address, if the cluster has one.
    pub fn lobby_address(&self) -> Option<Ipv4Addr> {
        self.view.current().lobby_addresses().next()
    }

    /// The command that reaches VM `name`: `ssh [-p PORT] NAME.ZONE`.
    pub fn ssh_command(&self, name: &str) -> String {
        self.ssh_to(&format!("{name}.{}", self.zone()))
    }

    /// The command that reaches the lobby: `ssh [-p PORT] ZONE`.
    pub fn zone_ssh(&self) -> String {
        self.ssh_to(&self.zone())
    }

    fn ssh_to(&self, host: &str) -> String {
        match self.settings.ssh_port {
            22 => format!("ssh {host}"),
            p => format!("ssh -p {p} {host}"),
        }
    }

    /// `https://NAME.ZONE[:PORT]/`, when a proxy serves HTTPS.
    pub fn https_url(&self, name: &str) -> Option<String> {
        let zone = self.zone();
        self.settings.https_port.map(|p| match p {
            443 => format!("https://{name}.{zone}/"),
            p => format!("https://{name}.{zone}:{p}/"),
        })
    }

    /// `https://ZONE[:PORT]/PATH` (the port when it is not 443), e.g. a registration link.
    pub fn apex_url(&self, path: &str) -> String {
        let zone = self.zone();
        match self.settings.https_port {
            None | Some(443) => format!("https://{zone}/{path}"),
            Some(p) => format!("https://{zone}:{p}/{path}"),
        }
    }

    /// Takes one registration link for `peer` at `now` from the per-address limits.
    fn take_registration(&self, peer: IpAddr, now: u64) -> Result<(), OpError> {
        self.registrations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(peer, now)
            .map_err(|why| OpError::new(ErrorKind::Exhausted, why.to_string()))
    }
}

#[cfg(test)]
mod tests;

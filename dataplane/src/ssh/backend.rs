//! What the SSH front door needs from the control plane, as a narrow consumer-side trait: log
//! writes (through the leader) and a few reads of the local replica that the View does not
//! carry. `boxd` implements it on its replica; tests can implement it on anything.

use std::future::Future;
use std::pin::Pin;

use boxd_model::command::{ApplyError, Command, Outcome};
use boxd_model::model::{AccountId, Fingerprint, Millis, Node, Registration, SshKey, Vm};

/// A boxed, `Send` future (russh's handler futures must be `Send`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The log refused the command; the message is for the user.
    #[error(transparent)]
    Rejected(#[from] ApplyError),
    /// The control plane could not be reached or failed; try again later.
    #[error("the control plane is unavailable ({0}); try again in a moment")]
    Unavailable(String),
}

/// The control-plane operations the SSH lobby uses.
pub trait Backend: Send + Sync + 'static {
    /// Appends `cmd` to the log through the leader.
    fn write(&self, cmd: Command) -> BoxFuture<'_, Result<Outcome, BackendError>>;
    /// An account's VMs (local replica).
    fn vms_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<Vm>, BackendError>>;
    /// An account's keys (local replica).
    fn keys_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<SshKey>, BackendError>>;
    /// The newest registration waiting for a key (local replica).
    fn registration_of(
        &self,
        fp: Fingerprint,
    ) -> BoxFuture<'_, Result<Option<Registration>, BackendError>>;
    /// The account's name and quota (local replica).
    fn account_name(
        &self,
        account: AccountId,
    ) -> BoxFuture<'_, Result<Option<(String, u32)>, BackendError>>;
    /// A VM's events, oldest first: (time, text) (local replica).
    fn events_of(
        &self,
        vm: boxd_model::model::VmId,
    ) -> BoxFuture<'_, Result<Vec<(Millis, String)>, BackendError>>;
    /// The cluster's workers with their capacity and what is placed on them (local replica).
    fn workers(&self) -> BoxFuture<'_, Result<Vec<Node>, BackendError>>;
    /// Wall-clock time for the commands the lobby proposes.
    fn now(&self) -> Millis;
}

//! What the operations need of the control plane, as a narrow consumer-side trait: log writes
//! (through the leader) and a few reads of the local replica that the View does not carry.
//! `boxd` implements it on its replica (ops/src/backend.rs); tests can implement it on anything.

use std::future::Future;
use std::pin::Pin;

use boxd_model::command::{Command, Outcome};
use boxd_model::model::{
    Account, AccountId, ApiToken, Fingerprint, Millis, Node, Registration, SshKey, Vm, VmId,
};
use boxd_model::tokens::SigningKey;

use crate::OpError;

/// A boxed, `Send` future (russh's handler futures must be `Send`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The control-plane calls the operations make. A refused write is [`OpError::from`] its
/// `ApplyError`; anything else that fails is [`OpError::unavailable`].
pub trait Backend: Send + Sync + 'static {
    /// Appends `cmd` to the log through the leader.
    fn write(&self, cmd: Command) -> BoxFuture<'_, Result<Outcome, OpError>>;
    /// An account's VMs (local replica).
    fn vms_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<Vm>, OpError>>;
    /// An account's keys (local replica).
    fn keys_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<SshKey>, OpError>>;
    /// The newest registration waiting for a key (local replica).
    fn registration_of(
        &self,
        fp: Fingerprint,
    ) -> BoxFuture<'_, Result<Option<Registration>, OpError>>;
    /// The registration with `code`, expired or not (local replica).
    fn registration(&self, code: String) -> BoxFuture<'_, Result<Option<Registration>, OpError>>;
    /// Registrations valid at `now`, oldest first, at most `limit` (local replica).
    fn registrations(
        &self,
        now: Millis,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Registration>, OpError>>;
    /// An account's API tokens, newest first (local replica).
    fn tokens_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<ApiToken>, OpError>>;
    /// The key that signs new API tokens, once one exists (local replica).
    fn signing_key(&self) -> BoxFuture<'_, Result<Option<SigningKey>, OpError>>;
    /// An account by id (local replica).
    fn account(&self, account: AccountId) -> BoxFuture<'_, Result<Option<Account>, OpError>>;
    /// An account by name (local replica).
    fn account_named(&self, name: String) -> BoxFuture<'_, Result<Option<Account>, OpError>>;
    /// A VM's events, oldest first: (time, text) (local replica).
    fn events_of(&self, vm: VmId) -> BoxFuture<'_, Result<Vec<(Millis, String)>, OpError>>;
    /// The cluster's workers with their capacity and what is placed on them (local replica).
    fn workers(&self) -> BoxFuture<'_, Result<Vec<Node>, OpError>>;
    /// Wall-clock time for the commands the operations propose.
    fn now(&self) -> Millis;
}

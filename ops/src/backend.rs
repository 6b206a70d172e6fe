//! The operations' [`Backend`] on this node's replica: log writes through the leader and reads
//! of the local SQLite replica.
//!
//! Front ends may run on their own runtimes (the SSH shards do); every replica call is spawned
//! onto the control plane's runtime, so the replica's tasks and gRPC channels stay on the
//! runtime that owns them.

use std::sync::Arc;

use boxd_controlplane::Replica;
use boxd_controlplane::command::{Command, Outcome};
use boxd_controlplane::model::{
    Account, AccountId, ApiToken, Fingerprint, Millis, Node, Registration, Role, SshKey, Vm, VmId,
};
use boxd_controlplane::replica::WriteError;
use boxd_controlplane::store::ReadError;
use boxd_controlplane::tokens::SigningKey;
use boxd_operations::{Backend, BoxFuture, OpError};

/// The operations' backend on this node's replica.
pub struct ReplicaBackend {
    replica: Arc<Replica>,
    rt: tokio::runtime::Handle,
}

impl ReplicaBackend {
    /// A backend running its calls on the current runtime.
    pub fn new(replica: Arc<Replica>) -> Self {
        Self {
            replica,
            rt: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `f` on the control plane's runtime.
    fn on_rt<T, F>(&self, f: impl FnOnce(Arc<Replica>) -> F) -> BoxFuture<'_, Result<T, OpError>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, OpError>> + Send + 'static,
    {
        let task = self.rt.spawn(f(Arc::clone(&self.replica)));
        Box::pin(async move {
            task.await
                .map_err(|e| OpError::unavailable(format!("the node is stopping ({e})")))?
        })
    }
}

fn read_err(e: ReadError) -> OpError {
    OpError::unavailable(e)
}

impl Backend for ReplicaBackend {
    fn write(&self, cmd: Command) -> BoxFuture<'_, Result<Outcome, OpError>> {
        self.on_rt(|r| async move {
            r.write(cmd).await.map_err(|e| match e {
                WriteError::Rejected(a) => OpError::from(a),
                e => OpError::unavailable(e),
            })
        })
    }

    fn vms_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<Vm>, OpError>> {
        self.on_rt(move |r| async move { r.reader().vms_of(account).await.map_err(read_err) })
    }

    fn keys_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<SshKey>, OpError>> {
        self.on_rt(move |r| async move { r.reader().keys_of(account).await.map_err(read_err) })
    }

    fn registration_of(
        &self,
        fp: Fingerprint,
    ) -> BoxFuture<'_, Result<Option<Registration>, OpError>> {
        self.on_rt(move |r| async move { r.reader().registration_of(fp).await.map_err(read_err) })
    }

    fn registration(&self, code: String) -> BoxFuture<'_, Result<Option<Registration>, OpError>> {
        self.on_rt(move |r| async move { r.reader().registration(code).await.map_err(read_err) })
    }

    fn registrations(
        &self,
        now: Millis,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Registration>, OpError>> {
        self.on_rt(move |r| async move {
            let reader = r.reader();
            reader
                .registrations_pending(now, limit)
                .await
                .map_err(read_err)
        })
    }

    fn tokens_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<ApiToken>, OpError>> {
        self.on_rt(move |r| async move { r.reader().tokens_of(account).await.map_err(read_err) })
    }

    fn signing_key(&self) -> BoxFuture<'_, Result<Option<SigningKey>, OpError>> {
        self.on_rt(|r| async move { r.reader().token_signing_key().await.map_err(read_err) })
    }

    fn account(&self, account: AccountId) -> BoxFuture<'_, Result<Option<Account>, OpError>> {
        self.on_rt(move |r| async move { r.reader().account(account).await.map_err(read_err) })
    }

    fn account_named(&self, name: String) -> BoxFuture<'_, Result<Option<Account>, OpError>> {
        self.on_rt(move |r| async move { r.reader().account_named(name).await.map_err(read_err) })
    }

    fn events_of(&self, vm: VmId) -> BoxFuture<'_, Result<Vec<(Millis, String)>, OpError>> {
        self.on_rt(move |r| async move { r.reader().vm_events(vm).await.map_err(read_err) })
    }

    fn workers(&self) -> BoxFuture<'_, Result<Vec<Node>, OpError>> {
        self.on_rt(|r| async move {
            let nodes = r.reader().nodes().await.map_err(read_err)?;
            Ok(nodes
                .into_iter()
                .filter(|n| n.roles.contains(&Role::Worker))
                .collect())
        })
    }

    fn now(&self) -> Millis {
        self.replica.now()
    }
}

//! The local replica on SQLite: schema, apply, row decoding, the dedicated-thread connection
//! wrapper, and a read-only reader for local queries ("reads are local").

pub mod apply;
pub mod rows;
pub mod schema;
pub mod sqlite;

use rusqlite::Connection;

use crate::model::ApiToken;
use crate::model::{
    Account, AccountId, ClusterSettings, Fingerprint, ImageAd, Millis, Node, NodeId, Registration,
    SshKey, TlsMaterial, Vm, VmId,
};
use crate::tokens::SigningKey;
use crate::view::{View, ViewChange, VmRoute};
pub use apply::Touched;
pub use sqlite::{Closed, Durability, SqliteThread};

/// The View entries that `touched` changed, read back from the tables inside the applying
/// transaction.
pub fn view_changes(c: &Connection, touched: &Touched) -> rusqlite::Result<Vec<ViewChange>> {
    let mut out = Vec::with_capacity(touched.vms.len() + touched.keys.len() + 1);
    if touched.settings
        && let Some(s) = rows::settings(c)?
    {
        out.push(ViewChange::Settings(s));
    }
    for id in &touched.vms {
        if let Some(route) = touched.created.get(id) {
            out.push(ViewChange::VmUpsert(std::sync::Arc::new(route.clone())));
            continue;
        }
        out.push(match rows::vm(c, *id)? {
            Some(v) => ViewChange::VmUpsert(std::sync::Arc::new(VmRoute::from(&v))),
            None => ViewChange::VmRemove(*id),
        });
    }
    for fp in &touched.keys {
        out.push(match rows::key_owner(c, fp)? {
            Some(a) => ViewChange::KeyUpsert(fp.clone(), a),
            None => ViewChange::KeyRemove(fp.clone()),
        });
    }
    for id in &touched.tokens {
        out.push(match rows::token_account(c, *id)? {
            Some(a) => ViewChange::TokenUpsert(*id, a),
            None => ViewChange::TokenRemove(*id),
        });
    }
    if touched.token_keys {
        out.push(ViewChange::TokenKeys(rows::token_public_keys(c)?));
    }
    for name in &touched.txt {
        out.push(match rows::txt(c, name)? {
            Some(v) => ViewChange::TxtUpsert(name.clone(), v.into()),
            None => ViewChange::TxtRemove(name.clone()),
        });
    }
    Ok(out)
}

/// A View of the whole state (startup and snapshot install).
pub fn full_view(c: &Connection, applied: u64) -> rusqlite::Result<View> {
    let vms = rows::vms(c)?;
    Ok(View::build(
        applied,
        rows::settings(c)?,
        vms.iter().map(VmRoute::from),
        rows::keys(c)?,
    )
    .with_txt(rows::all_txt(c)?)
    .with_tokens(rows::all_tokens(c)?, rows::token_public_keys(c)?))
}

/// A failure reading the local replica.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// SQLite failed.
    #[error("reading the local replica: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The reader thread stopped.
    #[error(transparent)]
    Closed(#[from] Closed),
}

/// Queries against the local replica. They run on the state machine's own connection, so
/// they see everything applied, including the tail not yet committed to SQLite (see
/// `raft::state_machine`); they queue behind applies, which are short.
#[derive(Clone)]
pub struct StateReader {
    db: SqliteThread,
}

impl StateReader {
    /// Reads through `db`, the state machine's connection.
    pub fn new(db: SqliteThread) -> Self {
        Self { db }
    }

    /// Runs an arbitrary read on the reader's thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        Ok(self.db.call(move |c| f(c)).await??)
    }

    /// Cluster settings.
    pub async fn settings(&self) -> Result<Option<ClusterSettings>, ReadError> {
        self.read(rows::settings).await
    }

    /// Every VM.
    pub async fn vms(&self) -> Result<Vec<Vm>, ReadError> {
        self.read(rows::vms).await
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<Node>, ReadError> {
        self.read(rows::nodes).await
    }

    /// One account.
    pub async fn account(&self, id: AccountId) -> Result<Option<Account>, ReadError> {
        self.read(move |c| rows::account(c, id)).await
    }

    /// An account's keys.
    pub async fn keys_of(&self, id: AccountId) -> Result<Vec<SshKey>, ReadError> {
        self.read(move |c| rows::keys_of(c, id)).await
    }

    /// A VM's events, oldest first: (time, text).
    pub async fn vm_events(
        &self,
        vm: crate::model::VmId,
    ) -> Result<Vec<(crate::model::Millis, String)>, ReadError> {
        self.read(move |c| rows::vm_events(c, vm)).await
    }

    /// An account's VMs.
    pub async fn vms_of(&self, id: AccountId) -> Result<Vec<Vm>, ReadError> {
        self.read(move |c| rows::vms_of(c, id)).await
    }

    /// The newest registration waiting for a key.
    pub async fn registration_of(
        &self,
        fp: Fingerprint,
    ) -> Result<Option<Registration>, ReadError> {
        self.read(move |c| rows::registration_of(c, &fp)).await
    }

    /// The registration with `code`, expired or not.
    pub async fn registration(&self, code: String) -> Result<Option<Registration>, ReadError> {
        self.read(move |c| rows::registration(c, &code)).await
    }

    /// Registrations still valid at `now`, oldest first, at most `limit`.
    pub async fn registrations_pending(
        &self,
        now: Millis,
        limit: u32,
    ) -> Result<Vec<Registration>, ReadError> {
        self.read(move |c| rows::registrations_pending(c, now, limit))
            .await
    }

    /// An account's tokens, newest first.
    pub async fn tokens_of(&self, id: AccountId) -> Result<Vec<ApiToken>, ReadError> {
        self.read(move |c| rows::tokens_of(c, id)).await
    }

    /// The key that signs new tokens.
    pub async fn token_signing_key(&self) -> Result<Option<SigningKey>, ReadError> {
        self.read(rows::token_signing_key).await
    }

    /// One account by name.
    pub async fn account_named(&self, name: String) -> Result<Option<Account>, ReadError> {
        self.read(move |c| rows::account_named(c, &name)).await
    }

    /// The SSH host key, once a proxy has stored one.
    pub async fn ssh_host_key(&self) -> Result<Option<String>, ReadError> {
        self.read(|c| rows::meta(c, rows::SSH_HOST_KEY)).await
    }

    /// The cluster's local CA, once a proxy has stored one.
    pub async fn tls_local_ca(&self) -> Result<Option<TlsMaterial>, ReadError> {
        self.read(rows::tls_local_ca).await
    }

    /// The cluster secret (hex).
    pub async fn cluster_secret(&self) -> Result<Option<String>, ReadError> {
        self.read(rows::cluster_secret).await
    }

    /// What worker `node` acts on, read in one transaction: the VMs placed on it, the deleted
    /// VMs it still has to remove, and every member (whose Raft addresses VMs may not reach).
    pub async fn worker_state(&self, node: NodeId) -> Result<WorkerState, ReadError> {
        self.read(move |c| {
            Ok(WorkerState {
                vms: rows::vms_on(c, node)?,
                deleted: rows::deleted_on(c, node)?,
                members: rows::nodes(c)?,
            })
        })
        .await
    }

    /// The images node `node` has published.
    pub async fn images_of(&self, node: NodeId) -> Result<Vec<ImageAd>, ReadError> {
        self.read(move |c| rows::images_of(c, node)).await
    }

    /// Who published image `name`, newest build first: (node, its Raft address, the image).
    pub async fn image_sources(
        &self,
        name: String,
    ) -> Result<Vec<(NodeId, String, ImageAd)>, ReadError> {
        self.read(move |c| rows::image_sources(c, &name)).await
    }
}

/// What a worker acts on (see [`StateReader::worker_state`]).
#[derive(Clone, Debug, Default)]
pub struct WorkerState {
    /// The VMs placed on it.
    pub vms: Vec<Vm>,
    /// Deleted VMs it still has to remove.
    pub deleted: Vec<VmId>,
    /// Every member of the cluster.
    pub members: Vec<Node>,
}

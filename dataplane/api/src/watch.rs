//! `WatchVms`: the account's VMs (those the token covers) as they are, then each change as
//! this node's replica applies it. Changes are found in the View (a route that is not the
//! one seen last); the full VM is read from the replica for those. The stream ends when the
//! client goes, or with `UNAUTHENTICATED` when the token expires or is revoked.

use std::collections::HashMap;
use std::sync::Arc;

use boxd_model::model::VmId;
use boxd_model::view::VmRoute;
use boxd_operations::{Caller, Credential, Operations};
use tokio::sync::mpsc;
use tonic::Status;

use crate::convert::{self, status};
use crate::pb;

/// Events buffered for a slow client; past this the watch waits for it.
pub const BUFFER: usize = 64;

/// Watches one account may have open at once (each scans the View on every change).
pub const MAX_PER_ACCOUNT: usize = 16;

/// Open watches per account.
#[derive(Default)]
pub struct Open(std::sync::Mutex<HashMap<boxd_model::model::AccountId, usize>>);

/// One open watch, counted until it is dropped.
pub struct Slot(Arc<Open>, boxd_model::model::AccountId);

impl Open {
    /// A slot for one more watch of `account`, or `RESOURCE_EXHAUSTED`.
    pub fn take(self: &Arc<Self>, account: boxd_model::model::AccountId) -> Result<Slot, Status> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(account).or_insert(0);
        if *n >= MAX_PER_ACCOUNT {
            return Err(Status::resource_exhausted(format!(
                "this account has {MAX_PER_ACCOUNT} watches open, the most it may: close one"
            )));
        }
        *n += 1;
        Ok(Slot(Arc::clone(self), account))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self
            .0
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

type Tx = mpsc::Sender<Result<pb::VmEvent, Status>>;

/// Runs one watch until the client goes or the token ends.
pub async fn run(ops: Arc<Operations>, caller: Caller, tx: Tx) -> Option<()> {
    let mut changes = ops.view().subscribe();
    let mut seen: HashMap<VmId, (Arc<VmRoute>, pb::Vm)> = HashMap::new();
    let mut initial = true;
    let mut rescan = true;
    loop {
        if let Err(e) = still_valid(&ops, &caller) {
            let _ = tx.send(Err(e)).await;
            return None;
        }
        if !rescan {
            rescan = wait(&mut changes, &tx).await?;
            continue;
        }
        let routes = mine(&ops, &caller);
        let changed: Vec<VmId> = routes
            .iter()
            .filter(|(id, r)| seen.get(*id).is_none_or(|(old, _)| old != *r))
            .map(|(id, _)| *id)
            .collect();
        if !changed.is_empty() {
            let vms = match ops.list(&caller).await {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.send(Err(status(e))).await;
                    return None;
                }
            };
            for v in vms.iter().filter(|v| changed.contains(&v.id)) {
                let msg = convert::vm(&ops, v);
                if let Some(r) = routes.get(&v.id) {
                    seen.insert(v.id, (Arc::clone(r), msg.clone()));
                }
                let ev = pb::VmEvent {
                    vm: Some(msg),
                    deleted: false,
                    initial,
                };
                tx.send(Ok(ev)).await.ok()?;
            }
        }
        let gone: Vec<VmId> = seen
            .keys()
            .filter(|id| !routes.contains_key(*id))
            .copied()
            .collect();
        for id in gone {
            if let Some((_, msg)) = seen.remove(&id) {
                let ev = pb::VmEvent {
                    vm: Some(msg),
                    deleted: true,
                    initial: false,
                };
                tx.send(Ok(ev)).await.ok()?;
            }
        }
        initial = false;
        rescan = wait(&mut changes, &tx).await?;
    }
}

/// Waits for the next applied change (`Some(true)`: scan the View again), a second to pass
/// (`Some(false)`: only check the token again), or the client to go (`None`).
async fn wait(changes: &mut tokio::sync::watch::Receiver<u64>, tx: &Tx) -> Option<bool> {
    tokio::select! {
        r = changes.changed() => r.is_ok().then_some(true),
        () = tx.closed() => None,
        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => Some(false),
    }
}

/// The caller's VMs in the View that the token covers.
fn mine(ops: &Operations, caller: &Caller) -> HashMap<VmId, Arc<VmRoute>> {
    let scope = caller.scope();
    let view = ops.view().current();
    view.vms()
        .filter(|r| r.owner == caller.account && scope.covers(&r.name))
        .map(|r| (r.id, Arc::clone(r)))
        .collect()
}

/// `UNAUTHENTICATED` once the caller's token has expired or was revoked.
fn still_valid(ops: &Operations, caller: &Caller) -> Result<(), Status> {
    let Credential::Token(t) = &caller.credential else {
        return Ok(());
    };
    if t.expires_at <= crate::auth::now_ms() {
        return Err(Status::unauthenticated("the token has expired"));
    }
    if !ops.view().current().token_live(t.id, t.account) {
        return Err(Status::unauthenticated("the token was revoked"));
    }
    Ok(())
}

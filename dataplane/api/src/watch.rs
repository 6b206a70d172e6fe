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

type Tx = mpsc::Sender<Result<pb::VmEvent, Status>>;

/// Runs one watch until the client goes or the token ends.
pub async fn run(ops: Arc<Operations>, caller: Caller, tx: Tx) {
    let mut changes = ops.view().subscribe();
    let mut seen: HashMap<VmId, (Arc<VmRoute>, pb::Vm)> = HashMap::new();
    let mut initial = true;
    loop {
        if let Err(e) = still_valid(&ops, &caller) {
            let _ = tx.send(Err(e)).await;
            return;
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
                    return;
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
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
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
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        }
        initial = false;
        // Wake on the next applied change, the client going, or once a second (to notice a
        // token expiring).
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tx.closed() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
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

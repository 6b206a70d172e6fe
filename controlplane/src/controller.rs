//! Background loops of a running node: every node heartbeats through the log; the leader
//! places waiting VMs and promotes caught-up control learners. Each loop ends when `shutdown`
//! turns true.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::command::Command;
use crate::model::{Capacity, Millis};
use crate::replica::Replica;
use crate::scheduler;
use crate::store::rows;

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Writes a heartbeat every `every`.
pub async fn heartbeat(
    replica: Arc<Replica>,
    capacity: Capacity,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let cmd = Command::Heartbeat {
            node: replica.id(),
            capacity,
            at: replica.now(),
        };
        if let Err(e) = replica.write(cmd).await {
            tracing::warn!(error = %e, "heartbeat not written");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Most VMs one scheduler pass considers; the rest wait for the next pass.
const PASS_LIMIT: usize = 512;

/// On the leader: after View changes and at least every second, places waiting VMs and
/// promotes caught-up control learners. Passes start at most every 10 ms, so a burst of writes
/// costs few passes while a change is acted on within 10 ms (a user's `new` waits for it; a
/// pass that finds nothing waiting costs O(nodes)).
pub async fn leader_duties(
    replica: Arc<Replica>,
    liveness: Millis,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changed = replica.view().subscribe();
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep_until(last + Duration::from_millis(10)).await;
        last = tokio::time::Instant::now();
        if replica.is_leader() {
            if let Err(e) = place_waiting(&replica, liveness).await {
                tracing::warn!(error = %e, "scheduler pass failed");
            }
            if let Err(e) = crate::membership::promote_caught_up(&replica).await {
                tracing::warn!(error = %e, "membership reconcile failed");
            }
        }
        tokio::select! {
            _ = changed.changed() => {
                changed.mark_unchanged();
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// One scheduler pass: proposes `PlaceVm` for waiting VMs that fit somewhere. Costs O(nodes)
/// when nothing waits or no worker is alive, O(nodes + PASS_LIMIT) otherwise.
pub async fn place_waiting(replica: &Replica, liveness: Millis) -> Result<usize, String> {
    let now = replica.now();
    let (workers, waiting) = replica
        .reader()
        .read(move |c| {
            let workers = scheduler::live_workers(&rows::nodes(c)?, now, liveness);
            let waiting = if workers.is_empty() {
                Vec::new()
            } else {
                rows::unplaced_vms(c, PASS_LIMIT)?
            };
            Ok((workers, waiting))
        })
        .await
        .map_err(|e| e.to_string())?;
    if waiting.is_empty() {
        return Ok(0);
    }
    let plan = scheduler::plan(workers, &waiting);
    let mut placed = 0;
    for (vm, worker) in plan {
        let cmd = Command::PlaceVm {
            vm,
            worker,
            at: replica.now(),
        };
        match replica.write(cmd).await {
            Ok(_) => placed += 1,
            Err(e) => tracing::info!(%vm, worker, error = %e, "placement refused"),
        }
    }
    Ok(placed)
}

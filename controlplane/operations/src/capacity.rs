//! What the operations say about room for a VM: a size no worker could ever hold is refused at once
//! with the numbers, and a VM that waits says what it waits for. From the workers' totals and
//! what VMs placed on them take, as the local replica has them.

use boxd_model::model::{Node, VmSpec};

/// Why no worker of `workers` could ever hold a VM of `want` (even empty), if none could; none
/// when one could or when there is no worker yet (a worker may still join).
pub fn never_fits(workers: &[Node], want: &VmSpec) -> Option<String> {
    if workers.is_empty() || workers.iter().any(|w| holds(w, want)) {
        return None;
    }
    let most = |f: fn(&Node) -> u64| workers.iter().map(f).max().unwrap_or(0);
    let (cpus, mem, disk) = (
        most(|w| u64::from(w.capacity.vcpus)),
        most(|w| w.capacity.memory_mib),
        most(|w| w.capacity.disk_gib),
    );
    Some(if u64::from(want.vcpus) > cpus {
        format!(
            "no worker offers {} vCPUs; the largest offers {cpus}: ask for at most --cpus={cpus}",
            want.vcpus
        )
    } else if want.memory_mib > mem {
        format!(
            "no worker offers {} MiB of memory; the largest offers {mem} MiB",
            want.memory_mib
        )
    } else if want.disk_gib > disk {
        format!(
            "no worker offers {} GiB of disk; the largest offers {disk} GiB",
            want.disk_gib
        )
    } else {
        format!(
            "no single worker offers {} vCPUs, {} MiB of memory and {} GiB of disk together; {}",
            want.vcpus,
            want.memory_mib,
            want.disk_gib,
            offers(workers)
        )
    })
}

/// What a VM of `want` waits for, as one sentence.
pub fn waiting(workers: &[Node], want: &VmSpec) -> String {
    let Some(best) = workers.iter().max_by_key(|w| free(w).1) else {
        return "waiting for a worker: this cluster has none yet (add one with \
                `boxd join … --role worker`)"
            .to_owned();
    };
    let (cpus, mem, disk) = free(best);
    // Every VM is pending until the next scheduler pass (milliseconds): with room somewhere,
    // that is all it waits for.
    if workers.iter().any(|w| room_for(w, want)) {
        return "waiting to be placed on a worker".to_owned();
    }
    // Numbers only: which hosts a cluster has is not a tenant's business.
    format!(
        "waiting for a worker with room for {} vCPUs, {} MiB, {} GiB: the most free one now has \
         {cpus} vCPUs, {mem} MiB, {disk} GiB free; it starts when VMs stop or are removed, or a \
         worker joins",
        want.vcpus, want.memory_mib, want.disk_gib
    )
}

fn holds(w: &Node, want: &VmSpec) -> bool {
    w.capacity.vcpus >= want.vcpus
        && w.capacity.memory_mib >= want.memory_mib
        && w.capacity.disk_gib >= want.disk_gib
}

fn room_for(w: &Node, want: &VmSpec) -> bool {
    let (cpus, mem, disk) = free(w);
    cpus >= want.vcpus && mem >= want.memory_mib && disk >= want.disk_gib
}

fn free(w: &Node) -> (u32, u64, u64) {
    (
        w.capacity.vcpus.saturating_sub(w.used.vcpus),
        w.capacity.memory_mib.saturating_sub(w.used.memory_mib),
        w.capacity.disk_gib.saturating_sub(w.used.disk_gib),
    )
}

fn offers(workers: &[Node]) -> String {
    let list: Vec<String> = workers
        .iter()
        .map(|w| {
            format!(
                "one offers {} vCPUs, {} MiB, {} GiB",
                w.capacity.vcpus, w.capacity.memory_mib, w.capacity.disk_gib
            )
        })
        .collect();
    list.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxd_model::model::Capacity;

    fn worker(id: u64, vcpus: u32, memory_mib: u64, used_mib: u64) -> Node {
        Node {
            id,
            uuid: uuid::Uuid::nil(),
            name: format!("w{id}"),
            roles: Default::default(),
            raft_addr: String::new(),
            capacity: Capacity {
                vcpus,
                memory_mib,
                disk_gib: 100,
            },
            used: Capacity {
                vcpus: 0,
                memory_mib: used_mib,
                disk_gib: 0,
            },
            last_heartbeat: 0,
            joined_at: 0,
        }
    }

    fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
        VmSpec {
            vcpus,
            memory_mib,
            ..VmSpec::default()
        }
    }

    #[test]
    fn sizes_no_worker_holds_are_refused_with_the_numbers() {
        let ws = [worker(1, 2, 4096, 0), worker(2, 8, 2048, 0)];
        assert_eq!(
            never_fits(&[], &spec(64, 512)),
            None,
            "a worker may still join"
        );
        assert_eq!(never_fits(&ws, &spec(8, 1024)), None);
        let why = never_fits(&ws, &spec(64, 512)).expect("refused");
        assert!(
            why.contains("no worker offers 64 vCPUs; the largest offers 8"),
            "{why}"
        );
        let why = never_fits(&ws, &spec(8, 4096)).expect("refused");
        assert!(why.contains("no single worker"), "{why}");
        let busy = [worker(1, 2, 4096, 1024), worker(2, 8, 2048, 0)];
        let why = waiting(&busy, &spec(2, 4096));
        assert!(
            why.contains("the most free one now has 2 vCPUs, 3072 MiB"),
            "{why}"
        );
        assert!(!why.contains("w1"), "no host names for tenants: {why}");
        // With room somewhere it waits only for the scheduler's next pass.
        assert_eq!(
            waiting(&ws, &spec(2, 1024)),
            "waiting to be placed on a worker"
        );
    }
}

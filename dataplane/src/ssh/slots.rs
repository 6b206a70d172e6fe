//! Handshake slots: connections still authenticating, bounded per shard and per client address.
//! When a shard is full, a newcomer does not simply lose: the oldest handshake of the address
//! holding the most slots is cut off for it, as long as that address holds at least two more
//! than the newcomer's would — so addresses that flood a shard (issue 25: 16 addresses × 32
//! kept the owner out) crowd out each other, not the one that asks once. The eviction cuts the
//! victim's socket (`cutoff`), ending its session wherever it is.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::cutoff::Switch;

/// Per-shard handshakes in progress, by client address (oldest first).
#[derive(Clone, Default)]
pub(crate) struct Limits(Arc<Mutex<Table>>);

#[derive(Default)]
struct Table {
    total: usize,
    next_id: u64,
    by_ip: HashMap<IpAddr, VecDeque<(u64, Switch)>>,
}

/// A handshake in progress, counted until dropped (authentication done, or the connection
/// gone).
pub(crate) struct HandshakeSlot {
    limits: Limits,
    ip: IpAddr,
    id: u64,
}

impl HandshakeSlot {
    /// Takes a slot for a connection from `ip` whose socket `switch` cuts, evicting another
    /// address's oldest handshake if the shard is full and that address holds at least two
    /// more slots than `ip` would; `None` when `ip` has `per_ip` already or nothing can give way.
    pub fn take(
        limits: &Limits,
        ip: IpAddr,
        per_shard: usize,
        per_ip: usize,
        switch: Switch,
    ) -> Option<Self> {
        let mut t = limits.0.lock().unwrap_or_else(|p| p.into_inner());
        let mine = t.by_ip.get(&ip).map_or(0, VecDeque::len);
        if mine >= per_ip {
            return None;
        }
        if t.total >= per_shard {
            let (victim, held) = t
                .by_ip
                .iter()
                .map(|(ip, q)| (*ip, q.len()))
                .max_by_key(|(_, n)| *n)?;
            if held < mine + 2 {
                return None;
            }
            let q = t.by_ip.get_mut(&victim)?;
            let (_, cut) = q.pop_front()?;
            if q.is_empty() {
                t.by_ip.remove(&victim);
            }
            t.total -= 1;
            cut.cut();
            tracing::debug!(%victim, newcomer = %ip, "shard full: the oldest handshake of the busiest address gave way");
        }
        let id = t.next_id;
        t.next_id += 1;
        t.by_ip.entry(ip).or_default().push_back((id, switch));
        t.total += 1;
        Some(Self {
            limits: limits.clone(),
            ip,
            id,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut t = self.limits.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = t.by_ip.get_mut(&self.ip) else {
            return;
        };
        // An evicted slot was taken out already.
        let Some(pos) = q.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        q.remove(pos);
        if q.is_empty() {
            t.by_ip.remove(&self.ip);
        }
        t.total -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    fn total(l: &Limits) -> usize {
        l.0.lock().expect("lock").total
    }

    #[test]
    fn a_full_shard_makes_the_busiest_address_give_way() {
        let l = Limits::default();
        let mut held = Vec::new();
        let mut switches = Vec::new();
        // Two flooding addresses fill a shard of 8 (4 each).
        for n in [1, 2] {
            for _ in 0..4 {
                let s = Switch::default();
                held.push(HandshakeSlot::take(&l, ip(n), 8, 4, s.clone()).expect("room"));
                switches.push(s);
            }
        }
        assert!(
            HandshakeSlot::take(&l, ip(1), 8, 4, Switch::default()).is_none(),
            "per address"
        );
        // A newcomer gets in: the busiest address's oldest handshake is cut.
        let owner = HandshakeSlot::take(&l, ip(9), 8, 4, Switch::default()).expect("owner");
        assert_eq!(total(&l), 8);
        assert_eq!(switches.iter().filter(|s| s.is_cut()).count(), 1);
        let cut = switches.iter().position(Switch::is_cut).expect("one cut");
        assert!(cut == 0 || cut == 4, "the oldest of one of the two: {cut}");
        // Dropping the evicted slot later changes nothing; dropping a live one frees it.
        drop(held.remove(cut));
        assert_eq!(total(&l), 8);
        drop(held.pop());
        assert_eq!(total(&l), 7);
        drop(owner);
        // Between equals nobody gives way: 4 addresses × 2 in a shard of 8.
        let l = Limits::default();
        let _even: Vec<_> = (1..=4)
            .flat_map(|n| [n, n])
            .map(|n| HandshakeSlot::take(&l, ip(n), 8, 4, Switch::default()).expect("room"))
            .collect();
        let third = HandshakeSlot::take(&l, ip(1), 8, 4, Switch::default());
        assert!(
            third.is_none(),
            "an address with 2 does not evict one with 2"
        );
        assert!(HandshakeSlot::take(&l, ip(9), 8, 4, Switch::default()).is_some());
    }
}

//! How many registration links one source address may have made: each costs a Raft write that
//! any stranger can cause (an unknown key is all it takes), so a proxy grants an address at
//! most [`PER_ADDRESS`] new links per [`WINDOW_MS`] (IPv6 counted per /64, what one host
//! usually holds). The stored total is bounded where the links are applied, in the replica:
//! the oldest expire first. Sans-io: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;

use boxd_model::model::Millis;

/// New registration links per source address per window.
pub const PER_ADDRESS: u32 = 10;
/// The window (one hour).
pub const WINDOW_MS: Millis = 3600 * 1000;
/// Addresses remembered per window. Past this many distinct addresses in one window, new ones
/// are refused until it ends (registrations only; registered keys are never affected).
const MAX_ADDRESSES: usize = 65_536;

/// Counts per address in the current fixed window.
#[derive(Debug, Default)]
pub struct RegistrationLimits {
    window_start: Millis,
    counts: HashMap<IpAddr, u32>,
}

/// Why no link was made.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// This address made its share in this window.
    #[error(
        "{PER_ADDRESS} registration links were already made from your address in the last hour; try again later"
    )]
    Address,
    /// Too many addresses asked in this window.
    #[error("too many registration links were asked for in the last hour; try again later")]
    Busy,
}

impl RegistrationLimits {
    /// Takes one link for `ip` at `now`, or says why not.
    pub fn take(&mut self, ip: IpAddr, now: Millis) -> Result<(), Refused> {
        if now.saturating_sub(self.window_start) >= WINDOW_MS || now < self.window_start {
            self.window_start = now;
            self.counts.clear();
        }
        let key = per_host(ip);
        if !self.counts.contains_key(&key) && self.counts.len() >= MAX_ADDRESSES {
            return Err(Refused::Busy);
        }
        let n = self.counts.entry(key).or_insert(0);
        if *n >= PER_ADDRESS {
            return Err(Refused::Address);
        }
        *n += 1;
        Ok(())
    }
}

/// The address a limit counts: IPv4 as it is, IPv6 by its /64.
fn per_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_share_per_window() {
        let mut l = RegistrationLimits::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..PER_ADDRESS {
            assert_eq!(l.take(a, 1000), Ok(()));
        }
        assert_eq!(l.take(a, 2000), Err(Refused::Address));
        assert_eq!(l.take(b, 2000), Ok(()), "another address is not affected");
        assert_eq!(l.take(a, 1000 + WINDOW_MS), Ok(()), "a new window");
        // One IPv6 host (a /64) is one address.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for i in 0..PER_ADDRESS {
            assert_eq!(l.take(v6(&format!("2001:db8::{i:x}")), 5000), Ok(()));
        }
        assert_eq!(l.take(v6("2001:db8::ffff"), 5000), Err(Refused::Address));
        assert_eq!(l.take(v6("2001:db8:0:1::1"), 5000), Ok(()));
    }

    #[test]
    fn the_address_table_is_bounded() {
        let mut l = RegistrationLimits::default();
        for i in 0..MAX_ADDRESSES as u32 {
            assert_eq!(l.take(IpAddr::from(i.to_be_bytes()), 0), Ok(()));
        }
        assert_eq!(
            l.take("203.0.113.1".parse().unwrap(), 1),
            Err(Refused::Busy)
        );
        assert_eq!(l.take(IpAddr::from(0u32.to_be_bytes()), 1), Ok(()));
        assert_eq!(l.take("203.0.113.1".parse().unwrap(), WINDOW_MS), Ok(()));
    }
}

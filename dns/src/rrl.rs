//! Response rate limiting (in the spirit of BIND's and Knot's RRL): a token bucket per client
//! network (/24 for IPv4, /56 for IPv6) limits how many UDP responses a source can draw, so the
//! server is a poor amplifier for spoofed-source floods. Over the limit, every `slip`-th
//! response is sent truncated (TC, no records: a real client retries over TCP, where spoofing
//! does not work) and the others are dropped. Sans-io: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;

/// What to do with a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// Send it truncated.
    Slip,
    /// Send nothing.
    Drop,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: u32,
    refilled_ms: u64,
    limited: u32,
}

/// Most client networks tracked; beyond this, idle buckets are forgotten.
const MAX_BUCKETS: usize = 65_536;

/// One shard's limiter.
pub struct RateLimiter {
    /// Responses per second per network; 0 is off.
    rate: u32,
    /// Every `slip`-th limited response is sent truncated; 0 drops them all.
    slip: u32,
    buckets: HashMap<u128, Bucket>,
}

fn network(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4) & 0xffff_ff00),
        IpAddr::V6(v6) => (u128::from(v6) & !((1u128 << 72) - 1)) | 1,
    }
}

impl RateLimiter {
    /// A limiter allowing `rate` responses per second per client network (0: no limit),
    /// sending every `slip`-th limited one truncated (0: none).
    pub fn new(rate: u32, slip: u32) -> Self {
        Self {
            rate,
            slip,
            buckets: HashMap::new(),
        }
    }

    /// Whether limiting is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0
    }

    /// Accounts one response to `peer` at `now_ms`.
    pub fn check(&mut self, peer: IpAddr, now_ms: u64) -> Verdict {
        let rate = self.rate;
        if rate == 0 {
            return Verdict::Send;
        }
        if self.buckets.len() >= MAX_BUCKETS {
            self.buckets
                .retain(|_, b| now_ms.saturating_sub(b.refilled_ms) < 1000);
        }
        let b = self.buckets.entry(network(peer)).or_insert(Bucket {
            tokens: rate,
            refilled_ms: now_ms,
            limited: 0,
        });
        let elapsed = now_ms.saturating_sub(b.refilled_ms);
        if elapsed > 0 {
            let add = u64::from(rate) * elapsed / 1000;
            if add > 0 {
                b.tokens =
                    u32::try_from((u64::from(b.tokens) + add).min(u64::from(rate))).unwrap_or(rate);
                b.refilled_ms = now_ms;
            }
        }
        if b.tokens > 0 {
            b.tokens -= 1;
            return Verdict::Send;
        }
        b.limited = b.limited.wrapping_add(1);
        if self.slip > 0 && b.limited.is_multiple_of(self.slip) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// Rewrites a response in place to its truncated form: header (TC set, no records) and the
/// question. `msg` is one of our own responses, so its question name has no compression.
pub fn truncate(msg: &mut Vec<u8>) {
    if msg.len() < 12 {
        return;
    }
    let mut i = 12;
    if msg[4..6] == [0, 1] {
        while let Some(&len) = msg.get(i) {
            i += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        i += 4;
    }
    msg.truncate(i.min(msg.len()));
    msg[2] |= 0x02;
    msg[6..12].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_always_sends() {
        let mut r = RateLimiter::new(0, 2);
        for t in 0..1000 {
            assert_eq!(r.check("10.0.0.1".parse().unwrap(), t), Verdict::Send);
        }
    }

    #[test]
    fn limits_per_network_and_slips() {
        let mut r = RateLimiter::new(5, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let same_net: IpAddr = "10.0.0.200".parse().unwrap();
        let other: IpAddr = "10.0.1.1".parse().unwrap();
        let verdicts: Vec<Verdict> = (0..9)
            .map(|i| r.check(if i % 2 == 0 { a } else { same_net }, 0))
            .collect();
        assert_eq!(&verdicts[..5], &[Verdict::Send; 5]);
        assert_eq!(
            &verdicts[5..],
            &[Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]
        );
        assert_eq!(
            r.check(other, 0),
            Verdict::Send,
            "another /24 has its own bucket"
        );
        // One second later the bucket is full again.
        assert_eq!(r.check(a, 1000), Verdict::Send);
    }

    #[test]
    fn truncate_keeps_header_and_question() {
        // Header (QD=1, AN=1), question "a." A IN, then an answer.
        let mut m = vec![
            0, 1, 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
        ];
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
        truncate(&mut m);
        assert_eq!(m.len(), 19);
        assert_eq!(m[2] & 0x02, 0x02);
        assert_eq!(&m[6..12], &[0; 6]);
    }
}

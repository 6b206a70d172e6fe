//! What the front doors count, for `/metrics`: one process-wide set of relaxed atomic
//! counters (like a metrics library's default registry). The DNS, HTTPS and SSH shards add to
//! them on their paths; the exposition (boxd `metrics.rs`) reads them at each scrape.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The counters.
#[derive(Debug)]
pub struct Counters {
    /// DNS answers sent, by RCODE (the header's low four bits).
    pub dns_answers: [AtomicU64; 16],
    /// DNS queries dropped unanswered (malformed, or by response-rate limiting).
    pub dns_dropped: AtomicU64,
    /// HTTPS responses, by status class: index 1 to 5 for 1xx to 5xx (0: anything else).
    pub https_responses: [AtomicU64; 6],
    /// TLS handshakes that failed or timed out.
    pub https_handshake_errors: AtomicU64,
    /// HTTPS client connections accepted.
    pub https_connections: AtomicU64,
    /// HTTPS client connections closed.
    pub https_closed: AtomicU64,
    /// SSH connections accepted.
    pub ssh_connections: AtomicU64,
    /// SSH connections closed.
    pub ssh_closed: AtomicU64,
    /// SSH public keys refused (unknown to the lobby, or with no VM at that address).
    pub ssh_auth_failures: AtomicU64,
}

/// The process's counters.
pub static COUNTERS: Counters = Counters {
    dns_answers: [const { AtomicU64::new(0) }; 16],
    dns_dropped: AtomicU64::new(0),
    https_responses: [const { AtomicU64::new(0) }; 6],
    https_handshake_errors: AtomicU64::new(0),
    https_connections: AtomicU64::new(0),
    https_closed: AtomicU64::new(0),
    ssh_connections: AtomicU64::new(0),
    ssh_closed: AtomicU64::new(0),
    ssh_auth_failures: AtomicU64::new(0),
};

/// Adds one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Reads one.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// Counts a DNS answer by its RCODE.
pub fn dns_answer(message: &[u8]) {
    let rcode = message.get(3).map_or(0, |b| usize::from(b & 0x0f));
    inc(&COUNTERS.dns_answers[rcode]);
}

/// Counts an HTTPS response by its status code.
pub fn https_response(status: u16) {
    let class = usize::from(status / 100);
    inc(&COUNTERS.https_responses[if (1..=5).contains(&class) { class } else { 0 }]);
}

/// Counts an HTTPS response from its HTTP/1.1 bytes (`HTTP/1.1 NNN …`).
pub fn https_response_bytes(response: &[u8]) {
    let status = response
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    https_response(status);
}

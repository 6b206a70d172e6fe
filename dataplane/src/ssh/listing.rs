//! Texts the lobby prints from replica rows: a VM's events, keys waiting for approval and an
//! OpenSSH config.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use boxd_model::model::{Millis, Vm};
use boxd_operations::PendingKey;

/// Events, oldest first, one per line with its time (UTC, HTTP date form); the last `last`
/// of them, or all.
pub fn events(events: &[(Millis, String)], last: Option<usize>) -> String {
    let skip = last.map_or(0, |n| events.len().saturating_sub(n));
    let mut s = String::new();
    for (at, text) in &events[skip..] {
        let _ = writeln!(s, "{}  {text}", date(*at));
    }
    s
}

/// A time as HTTP dates print it (UTC).
pub(super) fn date(at: Millis) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(at))
}

/// Keys waiting behind registration links, one per line: code, key type, fingerprint and
/// when the link expires; then how to approve one. `ssh` is how to reach the lobby.
pub fn pending_keys(keys: &[PendingKey], ssh: &str) -> String {
    if keys.is_empty() {
        return "no keys are waiting for approval\n".into();
    }
    let mut s = String::new();
    for k in keys {
        let _ = writeln!(
            s,
            "{}  {}  {}  expires {}",
            k.code,
            k.key_type,
            k.fingerprint,
            date(k.expires_at)
        );
    }
    let _ = writeln!(
        s,
        "approve one with `{ssh} approve CODE` (a new account) or `{ssh} approve CODE --to-account=ACCOUNT`"
    );
    s
}

/// An OpenSSH config block: the lobby and each VM by name, with its address and the port, so
/// `ssh NAME.zone` works where the system resolver does not know the zone (`boxd up`'s
/// `boxd.test`).
pub fn ssh_config(zone: &str, lobby: Option<Ipv4Addr>, port: u16, vms: &[Vm]) -> String {
    let mut s = format!(
        "# {zone}: use with `ssh -F <(ssh -p {port} LOBBY ssh-config) NAME.{zone}`, or add to \
         ~/.ssh/config. Run it again after `new`.\n"
    );
    let mut host = |name: &str, ip: Ipv4Addr| {
        let _ = write!(s, "Host {name}\n  HostName {ip}\n  Port {port}\n");
    };
    if let Some(ip) = lobby {
        host(zone, ip);
    }
    for v in vms {
        host(&format!("{}.{zone}", v.name), v.public_ip);
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_last_events_are_kept_in_order() {
        let ev = vec![(0, "started".to_owned()), (1000, "stopped".to_owned())];
        let all = super::events(&ev, None);
        assert_eq!(
            all,
            "Thu, 01 Jan 1970 00:00:00 GMT  started\nThu, 01 Jan 1970 00:00:01 GMT  stopped\n"
        );
        assert_eq!(
            super::events(&ev, Some(1)),
            "Thu, 01 Jan 1970 00:00:01 GMT  stopped\n"
        );
        let cfg = super::ssh_config(
            "boxd.test",
            Some("127.77.0.1".parse().expect("ip")),
            2222,
            &[],
        );
        assert!(
            cfg.ends_with("Host boxd.test\n  HostName 127.77.0.1\n  Port 2222\n"),
            "{cfg}"
        );
    }
}

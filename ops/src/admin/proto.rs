//! The admin protocol: one JSON object per line each way over a Unix socket (mode 0600).
//!
//! Requests: `{"op":"status"}`, `{"op":"members"}`, `{"op":"vms"}`,
//! `{"op":"join-token","roles":["worker"],"ttl_secs":86400}`, `{"op":"registrations"}`,
//! `{"op":"approve","code":"…","name":"ann"}` (or `"to_account"`), `{"op":"rotate-token-key"}`,
//! `{"op":"write","command":{...}}` (a typed log command, for operators and tests).
//! Replies: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. A malformed line gets an
//! error reply and the connection stays usable. This module does no I/O.

use boxd_controlplane::Command;
use boxd_controlplane::model::Role;
use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    // The unit-like requests are empty struct variants: serde ignores unknown fields on unit
    // variants of internally tagged enums, and a typo must not pass silently.
    /// Node and replica status.
    Status {},
    /// Cluster members.
    Members {},
    /// Every VM in the local replica.
    Vms {},
    /// The cluster's agent public key (what guest agents must authorise).
    AgentKey {},
    /// Mint a join token.
    JoinToken {
        /// Roles the joining node may take.
        roles: Vec<Role>,
        /// Validity in seconds.
        #[serde(default = "default_ttl")]
        ttl_secs: u64,
    },
    /// Keys waiting behind registration links.
    Registrations {},
    /// Link a waiting key to a new account (named `name`, or one made from the code) or to
    /// the existing account `to_account`.
    Approve {
        /// The code.
        code: String,
        /// Name of the new account.
        #[serde(default)]
        name: Option<String>,
        /// Name or id of an existing account.
        #[serde(default)]
        to_account: Option<String>,
    },
    /// Add a new token signing key (the old ones verify until their tokens expire).
    RotateTokenKey {},
    /// Append a command to the log (through the leader).
    Write {
        /// The command.
        command: Command,
    },
}

fn default_ttl() -> u64 {
    24 * 3600
}

/// A reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The reason on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure.
    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }

    /// The reply as one line (with the newline).
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"reply could not be encoded"}"#.to_vec());
        v.push(b'\n');
        v
    }
}

/// Parses one request line (without the newline).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    serde_json::from_slice(line).map_err(|e| {
        format!("malformed request ({e}); expected a JSON object like {{\"op\":\"status\"}}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_request() {
        assert_eq!(parse_request(br#"{"op":"status"}"#), Ok(Request::Status {}));
        assert_eq!(
            parse_request(br#"{"op":"members"}"#),
            Ok(Request::Members {})
        );
        assert_eq!(
            parse_request(br#"{"op":"join-token","roles":["worker"]}"#),
            Ok(Request::JoinToken {
                roles: vec![Role::Worker],
                ttl_secs: 86400
            })
        );
        let w = br#"{"op":"write","command":{"type":"purge_vm","vm":"00000000-0000-0000-0000-000000000001"}}"#;
        assert!(matches!(parse_request(w), Ok(Request::Write { .. })));
    }

    #[test]
    fn rejects_garbage_with_a_message() {
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"op\":\"reboot\"}",
            b"{\"op\":\"status\",\"x\":1}",
            b"\xff\xfe",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains("malformed request"), "{e}");
        }
        let long = vec![b' '; MAX_LINE + 1];
        assert!(parse_request(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn reply_lines_end_with_newline() {
        let l = Reply::err("x").to_line();
        assert_eq!(l.last(), Some(&b'\n'));
        let back: Reply = serde_json::from_slice(&l).unwrap();
        assert_eq!(back, Reply::err("x"));
    }
}

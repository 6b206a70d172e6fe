//! The binary forms of Raft's bulk data: log entries as the log stores them and AppendEntries
//! requests as the Raft stream carries them, in postcard (serde's data model, varint integers,
//! UUIDs as 16 bytes, no field names).
//!
//! Both were JSON. A follower decoded every command it replicated from JSON (the `type`-tagged
//! form, which serde can only read by buffering each object first) and encoded it again to
//! store it; the leader encoded each entry once to store it and once per follower to send it.
//! That was about a tenth of a loaded three-node cluster's CPU; postcard does the same work
//! in roughly a tenth of the time and a quarter of the bytes. Everything else on the wire and
//! in the log's key-value table (votes, answers, snapshot metadata) stays JSON: small and rare.
//!
//! A stored entry starts with a format byte: [`ENTRY_POSTCARD`], or `{` for the JSON that logs
//! written before this form hold, which still decode.

use openraft::raft::AppendEntriesRequest;

use super::{Entry, TypeConfig};

/// First byte of an entry stored in postcard.
pub const ENTRY_POSTCARD: u8 = 1;

/// Why bytes did not decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Malformed postcard.
    #[error("malformed binary Raft data: {0}")]
    Postcard(#[from] postcard::Error),
    /// Malformed JSON (an entry stored before the binary form).
    #[error("malformed JSON Raft data: {0}")]
    Json(#[from] serde_json::Error),
    /// Well-formed, with bytes left over after it.
    #[error("{0} bytes left over after the value")]
    Trailing(usize),
    /// Neither form.
    #[error("a stored log entry starts with {0:#04x}: neither binary (0x01) nor JSON")]
    UnknownFormat(u8),
    /// Nothing at all.
    #[error("empty log entry")]
    Empty,
}

/// Appends `value` in postcard to `out`.
pub fn encode_into<T: serde::Serialize>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), postcard::Error> {
    *out = postcard::to_extend(value, std::mem::take(out))?;
    Ok(())
}

/// Reads exactly one postcard value from `bytes`.
pub fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(CodecError::Trailing(rest.len()))
    }
}

/// A log entry as stored.
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::with_capacity(256);
    out.push(ENTRY_POSTCARD);
    encode_into(entry, &mut out)?;
    Ok(out)
}

/// A stored log entry, in either form.
pub fn decode_entry(raw: &[u8]) -> Result<Entry, CodecError> {
    match raw.split_first() {
        Some((&ENTRY_POSTCARD, body)) => decode(body),
        Some((b'{', _)) => Ok(serde_json::from_slice(raw)?),
        Some((&other, _)) => Err(CodecError::UnknownFormat(other)),
        None => Err(CodecError::Empty),
    }
}

/// An AppendEntries request as the Raft stream carries it.
pub fn decode_append_entries(body: &[u8]) -> Result<AppendEntriesRequest<TypeConfig>, CodecError> {
    decode(body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::command::{Batch, Command};
    use crate::model::{AccountId, VmId, VmSpec};
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, Vote};

    fn entries() -> Vec<Entry> {
        let create = Command::CreateVm {
            id: VmId(uuid::Uuid::from_u128(7)),
            owner: AccountId(uuid::Uuid::from_u128(8)),
            name: "web".into(),
            spec: VmSpec::default(),
            http_port: 8080,
            at: 1_700_000_000_000,
        };
        let report = Command::ReportVm {
            vm: VmId(uuid::Uuid::from_u128(7)),
            worker: 3,
            observed: crate::model::Observed::Failed,
            private_ip: Some("10.0.0.2".parse().unwrap()),
            reason: Some("no image".into()),
            at: 5,
        };
        let id = |i| LogId::new(CommittedLeaderId::new(4, 1), i);
        vec![
            Entry {
                log_id: id(1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: id(2),
                payload: EntryPayload::Normal(Batch(vec![create, report])),
            },
            Entry {
                log_id: id(3),
                payload: EntryPayload::Membership(Membership::new(vec![[1, 2, 3].into()], None)),
            },
        ]
    }

    #[test]
    fn entries_round_trip_in_both_forms() {
        for e in entries() {
            let binary = encode_entry(&e).unwrap();
            assert_eq!(binary[0], ENTRY_POSTCARD);
            assert_eq!(decode_entry(&binary).unwrap(), e);
            // What logs written before the binary form hold.
            let json = serde_json::to_vec(&e).unwrap();
            assert_eq!(decode_entry(&json).unwrap(), e);
        }
    }

    #[test]
    fn append_entries_round_trips() {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(4, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(4, 1), 0)),
            entries: entries(),
            leader_commit: None,
        };
        let mut body = Vec::new();
        encode_into(&req, &mut body).unwrap();
        let back = decode_append_entries(&body).unwrap();
        assert_eq!(back.entries, req.entries);
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
    }

    #[test]
    fn damage_is_an_error() {
        let good = encode_entry(&entries()[1]).unwrap();
        for n in 0..good.len() {
            // Every truncation fails cleanly; none panics.
            assert!(decode_entry(&good[..n]).is_err(), "{n} bytes");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(matches!(decode_entry(&extra), Err(CodecError::Trailing(1))));
        assert!(matches!(
            decode_entry(b"\x07abc"),
            Err(CodecError::UnknownFormat(7))
        ));
        assert!(matches!(decode_entry(b""), Err(CodecError::Empty)));
    }
}

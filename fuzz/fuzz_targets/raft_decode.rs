//! Any bytes as a Raft stream AppendEntries body (postcard) and as a stored log entry (postcard
//! or JSON): decoding never panics, and what decodes encodes back to bytes that decode to the
//! same thing.
#![no_main]

use boxd_controlplane::raft::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = codec::decode_append_entries(data) {
        let mut again = Vec::new();
        codec::encode_into(&req, &mut again).expect("a decoded request encodes");
        let back = codec::decode_append_entries(&again).expect("re-encoded request decodes");
        assert_eq!(back.entries, req.entries);
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.leader_commit, req.leader_commit);
    }
    if let Ok(entry) = codec::decode_entry(data) {
        let again = codec::encode_entry(&entry).expect("a decoded entry encodes");
        assert_eq!(
            codec::decode_entry(&again).expect("re-encoded entry decodes"),
            entry
        );
    }
});

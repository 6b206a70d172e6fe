//! Any string as a join token: verification never panics and never accepts a token that was
//! not minted with the secret.
#![no_main]

use boxd_controlplane::token::{self, JoinGrant};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cluster = uuid::Uuid::from_u128(7);
    if let Ok(grant) = token::verify(SECRET, cluster, text, 0) {
        // Only a token equal to one we mint for the same grant can pass.
        let minted: JoinGrant = grant.clone();
        assert_eq!(token::issue(SECRET, &minted).expect("mint"), text.trim());
    }
});

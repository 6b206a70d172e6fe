//! Any bytes as the sign-in callback's query and `Cookie` header (split at the first newline):
//! parsing never panics, and no state is accepted but one the key made for that browser's
//! cookie, before it expired. The input is also tried as a registration code that a real
//! state is made for: it comes back for its own cookie and for no other.
#![no_main]

use boxd_oidc::state::{Callback, SIGN_IN_TTL_MS, StateKey};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = StateKey::new("client secret");
    let (query, cookies) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(Callback::Code { state, binding, .. }) = Callback::parse(query, cookies) {
        // The fuzzer cannot make a MAC.
        assert!(key.check(&state, &binding, NOW).is_err(), "{state:?}");
    }
    // As a registration code with a real state.
    if text.contains('.') || text.is_empty() {
        return;
    }
    let (state, binding) = key.start(text, NOW);
    assert_eq!(key.check(&state, &binding, NOW + 1), Ok(text));
    assert!(key.check(&state, "other", NOW + 1).is_err());
    assert!(key.check(&state, &binding, NOW + SIGN_IN_TTL_MS).is_err());
    let query = format!("code=c&state={}", state.replace('%', "%25").replace('&', "%26").replace('+', "%2B").replace('#', "%23"));
    let cookie = format!("{}={binding}", boxd_oidc::state::cookie_name(text));
    if let Ok(Callback::Code { state: s, .. }) = Callback::parse(&query, &cookie) {
        assert_eq!(s, state);
    }
});

//! Any bytes as an API token (`authorization: Bearer …`): checking never panics, and nothing
//! but a token signed by the cluster's key, for its audience and issuer, live and unexpired,
//! is accepted. The input is also tried as a token's claims, signed with the real key: then
//! whatever is accepted says exactly what the claims said.
#![no_main]

use std::sync::LazyLock;

use boxd_controlplane::tokens::{AUDIENCE, Claims, SigningKey, issuer, verify};
use libfuzzer_sys::fuzz_target;

static KEY: LazyLock<(SigningKey, Vec<u8>)> = LazyLock::new(|| {
    let k = SigningKey::generate().expect("key");
    let public = k.public().expect("public");
    (k, public)
});

const NOW: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (key, public) = &*KEY;
    let key_of = |kid: &str| (kid == key.kid).then(|| public.clone());
    // As a token: only ours could pass, and the fuzzer cannot sign.
    assert!(verify(text, "boxd.test", NOW, key_of, |_| true).is_err());
    // As claims, signed for real.
    let Ok(claims) = serde_json::from_str::<Claims>(text) else {
        return;
    };
    let Ok(token) = key.sign(&claims) else {
        return;
    };
    if let Ok(v) = verify(&token, "boxd.test", NOW, key_of, |_| true) {
        assert_eq!(claims.aud, AUDIENCE);
        assert_eq!(claims.iss, issuer("boxd.test"));
        assert!(claims.exp * 1000 > NOW);
        assert_eq!(claims.sub.parse().ok(), Some(v.account));
        assert_eq!(claims.jti.parse().ok(), Some(v.id));
        assert_eq!(v.scope.vms, claims.vms);
        assert_eq!(v.scope.read_only, claims.ro);
    }
    assert!(verify(&token, "boxd.test", NOW, key_of, |_| false).is_err(), "revoked");
});

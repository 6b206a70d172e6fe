#![allow(clippy::unwrap_used)]

use base64::Engine as _;

use super::*;

const ZONE: &str = "boxd.test";
const NOW: Millis = 1_800_000_000_000;

fn claims(account: AccountId, id: TokenId) -> Claims {
    Claims {
        iss: issuer(ZONE),
        aud: AUDIENCE.into(),
        sub: account.to_string(),
        jti: id.to_string(),
        iat: NOW / 1000,
        exp: NOW / 1000 + 600,
        vms: vec!["web".into()],
        ro: true,
    }
}

fn check(token: &str, key: &SigningKey, now: Millis) -> Result<Verified, TokenError> {
    let public = key.public().unwrap();
    let kid = key.kid.clone();
    verify(
        token,
        ZONE,
        now,
        |k| (k == kid).then(|| public.clone()),
        |_| true,
    )
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[test]
fn a_signed_token_verifies_with_its_scope() {
    let key = SigningKey::generate().unwrap();
    let (account, id) = (AccountId::random(), TokenId::random());
    let token = key.sign(&claims(account, id)).unwrap();
    let v = check(&token, &key, NOW).unwrap();
    assert_eq!((v.account, v.id), (account, id));
    assert_eq!(v.expires_at, NOW + 600_000);
    assert_eq!(
        v.scope,
        Scope {
            vms: vec!["web".into()],
            read_only: true
        }
    );
    // Revoked: the id is no longer live.
    let public = key.public().unwrap();
    let e = verify(&token, ZONE, NOW, |_| Some(public.clone()), |_| false);
    assert_eq!(e, Err(TokenError::Revoked));
    assert_eq!(check(&token, &key, NOW + 600_000), Err(TokenError::Expired));
}

#[test]
fn forged_foreign_and_malformed_tokens_are_refused() {
    let key = SigningKey::generate().unwrap();
    let (account, id) = (AccountId::random(), TokenId::random());
    let token = key.sign(&claims(account, id)).unwrap();
    // Another key under the same id: the signature does not match.
    let mut other = SigningKey::generate().unwrap();
    other.kid = key.kid.clone();
    let forged = other.sign(&claims(account, id)).unwrap();
    assert_eq!(check(&forged, &key, NOW), Err(TokenError::BadSignature));
    // Claims swapped under a valid signature (widening the scope).
    let (head, rest) = token.split_once('.').unwrap();
    let sig = rest.rsplit_once('.').unwrap().1;
    let mut wide = claims(account, id);
    wide.vms.clear();
    wide.ro = false;
    let body = b64(&serde_json::to_string(&wide).unwrap());
    assert_eq!(
        check(&format!("{head}.{body}.{sig}"), &key, NOW),
        Err(TokenError::BadSignature)
    );
    // An unknown key id.
    let stranger = SigningKey::generate().unwrap();
    let t = stranger.sign(&claims(account, id)).unwrap();
    assert_eq!(check(&t, &key, NOW), Err(TokenError::UnknownKey));
    // Another audience, another cluster.
    let mut c = claims(account, id);
    c.aud = "someone-else".into();
    let t = key.sign(&c).unwrap();
    assert!(matches!(check(&t, &key, NOW), Err(TokenError::NotForUs(_))));
    let mut c = claims(account, id);
    c.iss = issuer("other.example");
    let t = key.sign(&c).unwrap();
    assert!(matches!(check(&t, &key, NOW), Err(TokenError::NotForUs(_))));
    // `alg: none` and HMAC tokens, garbage, oversize.
    let none = format!(
        "{}.{}.",
        b64(&format!(r#"{{"alg":"none","kid":"{}"}}"#, key.kid)),
        b64(&serde_json::to_string(&claims(account, id)).unwrap())
    );
    let hs = format!(
        "{}.{}.AAAA",
        b64(&format!(r#"{{"alg":"HS256","kid":"{}"}}"#, key.kid)),
        b64("{}")
    );
    for bad in [
        none.as_str(),
        hs.as_str(),
        "",
        "a.b",
        "a.b.c",
        "....",
        "\u{0}.\u{0}.\u{0}",
    ] {
        assert!(
            matches!(check(bad, &key, NOW), Err(TokenError::Malformed(_))),
            "{bad:?}"
        );
    }
    let long = format!("{token}{}", "A".repeat(MAX_TOKEN_BYTES));
    assert!(matches!(
        check(&long, &key, NOW),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn a_scope_can_only_narrow() {
    let all = Scope::default();
    let web = Scope {
        vms: vec!["web".into()],
        read_only: false,
    };
    let web_ro = Scope {
        vms: vec!["web".into()],
        read_only: true,
    };
    assert!(web.within(&all) && web_ro.within(&web) && all.within(&all));
    assert!(!all.within(&web), "all VMs is wider than one");
    assert!(!web.within(&web_ro), "writes are wider than reads");
    let db = Scope {
        vms: vec!["db".into()],
        read_only: true,
    };
    assert!(!db.within(&web_ro));
    assert!(web.covers("web") && !web.covers("db") && all.covers("db"));
}

#[test]
fn the_key_set_publishes_public_halves() {
    let key = SigningKey::generate().unwrap();
    let public = PublicKey {
        kid: key.kid.clone(),
        key: key.public().unwrap(),
    };
    let set = jwks([&public]);
    assert_eq!(set["keys"][0]["kid"], key.kid);
    assert_eq!(set["keys"][0]["kty"], "OKP");
    assert_eq!(
        set["keys"][0]["x"].as_str().unwrap().len(),
        43,
        "32 bytes, base64url"
    );
    assert!(
        !format!("{key:?}").contains("pkcs8: ["),
        "no secret in Debug"
    );
}

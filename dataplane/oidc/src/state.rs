//! The sign-in's round trip through the provider, without storing anything: the `state`
//! parameter names the registration code and an expiry, and carries a MAC (keyed from the
//! client secret, which every proxy has) over them and a random value kept in a cookie of the
//! browser that started. The callback is accepted only with that cookie (login CSRF: someone
//! else's finished sign-in cannot be pasted into your browser) and before the expiry. The
//! OpenID `nonce` and the PKCE verifier derive from the state with the same key, so any proxy
//! can finish a sign-in another one started. Sans-io: the fuzz target drives [`Callback::parse`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How long a sign-in may take from the button to the callback.
pub const SIGN_IN_TTL_MS: u64 = 10 * 60 * 1000;

/// Longest query or cookie header looked at.
const MAX_INPUT: usize = 8192;

/// The key that signs states, derived from the client secret.
#[derive(Clone)]
pub struct StateKey([u8; 32]);

impl StateKey {
    /// The key for `client_secret`.
    pub fn new(client_secret: &str) -> Self {
        Self(Self::mac_with(
            client_secret.as_bytes(),
            b"boxd sign-in state v1",
        ))
    }

    fn mac_with(key: &[u8], msg: &[u8]) -> [u8; 32] {
        // HMAC takes keys of any length.
        let mut m = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable_key());
        m.update(msg);
        m.finalize().into_bytes().into()
    }

    fn mac(&self, parts: &[&str]) -> [u8; 32] {
        Self::mac_with(&self.0, parts.join("\0").as_bytes())
    }

    /// A new sign-in for `code` at `now`: the `state` to send, and the cookie value that must
    /// come back with it.
    pub fn start(&self, code: &str, now: u64) -> (String, String) {
        let binding = B64.encode(rand::random::<[u8; 16]>());
        let expires = now + SIGN_IN_TTL_MS;
        let mac = B64.encode(self.mac(&["state", code, &expires.to_string(), &binding]));
        (format!("{code}.{expires}.{mac}"), binding)
    }

    /// The OpenID `nonce` for `state`.
    pub fn nonce(&self, state: &str) -> String {
        B64.encode(self.mac(&["nonce", state]))
    }

    /// The PKCE verifier for `state` (43 characters of base64url, RFC 7636 4.1).
    pub fn verifier(&self, state: &str) -> String {
        B64.encode(self.mac(&["pkce", state]))
    }

    /// The registration code a callback's `state` is for, if the state is one this key made,
    /// for the browser that holds `binding`, and has not expired at `now`.
    pub fn check<'a>(&self, state: &'a str, binding: &str, now: u64) -> Result<&'a str, Refused> {
        let mut parts = state.split('.');
        let (Some(code), Some(expires), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refused::BadState);
        };
        let Ok(mac) = B64.decode(mac) else {
            return Err(Refused::BadState);
        };
        let mut m = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable_key());
        m.update(["state", code, expires, binding].join("\0").as_bytes());
        m.verify_slice(&mac).map_err(|_| Refused::BadState)?;
        let expires: u64 = expires.parse().map_err(|_| Refused::BadState)?;
        if now >= expires {
            return Err(Refused::Late);
        }
        Ok(code)
    }
}

fn unreachable_key() -> HmacSha256 {
    // `new_from_slice` fails only for fixed-size-key MACs; HMAC is not one.
    unreachable!("HMAC accepts keys of any length")
}

/// Why a callback is refused before the provider is asked anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No `state`, or not one of ours, or not for this browser.
    BadState,
    /// Started more than [`SIGN_IN_TTL_MS`] ago.
    Late,
    /// No `code` (and no `error`).
    NoCode,
}

/// What the provider sent back to `/register/callback`.
#[derive(Debug, PartialEq, Eq)]
pub enum Callback {
    /// The person signed in: the authorization code, the state, and the cookie that came
    /// with it (empty when none did).
    Code {
        /// Authorization code.
        code: String,
        /// `state`.
        state: String,
        /// The binding cookie for the state's registration code.
        binding: String,
    },
    /// The provider refused or the person cancelled (`error`, `error_description`).
    Error {
        /// `error`.
        error: String,
        /// `error_description`, possibly empty.
        description: String,
    },
}

/// The cookie that binds a sign-in for `code` to a browser.
pub fn cookie_name(code: &str) -> String {
    format!("boxd-signin-{code}")
}

impl Callback {
    /// Parses the callback's query (without `?`) and its `Cookie` header. A query longer than
    /// any a provider sends is refused whole (cutting it could cut a value).
    pub fn parse(query: &str, cookies: &str) -> Result<Self, Refused> {
        if query.len() > MAX_INPUT {
            return Err(Refused::BadState);
        }
        let mut code = None;
        let mut state = None;
        let mut error = None;
        let mut description = String::new();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "code" => code = Some(v.into_owned()),
                "state" => state = Some(v.into_owned()),
                "error" => error = Some(v.into_owned()),
                "error_description" => description = v.into_owned(),
                _ => {}
            }
        }
        if let Some(error) = error {
            return Ok(Self::Error { error, description });
        }
        let state = state.ok_or(Refused::BadState)?;
        let code = code.ok_or(Refused::NoCode)?;
        let reg = state.split('.').next().unwrap_or("");
        let binding = cookie(cookies, &cookie_name(reg)).unwrap_or("").to_owned();
        Ok(Self::Code {
            code,
            state,
            binding,
        })
    }
}

/// The value of cookie `name` in a `Cookie` header (RFC 6265 5.4: `a=1; b=2`); none from a
/// header longer than any browser sends for this site.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    if header.len() > MAX_INPUT {
        return None;
    }
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CODE: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_state_comes_back_only_to_its_browser_in_time() {
        let key = StateKey::new("secret");
        let (state, binding) = key.start(CODE, 1000);
        assert_eq!(key.check(&state, &binding, 1001), Ok(CODE));
        assert_eq!(key.check(&state, "other", 1001), Err(Refused::BadState));
        assert_eq!(key.check(&state, "", 1001), Err(Refused::BadState));
        assert_eq!(
            key.check(&state, &binding, 1000 + SIGN_IN_TTL_MS),
            Err(Refused::Late)
        );
        // Another key (another cluster's secret), an edited code or expiry.
        assert!(
            StateKey::new("other")
                .check(&state, &binding, 1001)
                .is_err()
        );
        let other = format!("{}{}", "f", &state[1..]);
        assert_eq!(key.check(&other, &binding, 1001), Err(Refused::BadState));
        let later = state.replace(&(1000 + SIGN_IN_TTL_MS).to_string(), "99999999999999");
        assert_eq!(key.check(&later, &binding, 1001), Err(Refused::BadState));
        for junk in ["", ".", "a.b.c.d", "a.1.!!", &format!("{CODE}.x.AAAA")] {
            assert_eq!(
                key.check(junk, &binding, 1001),
                Err(Refused::BadState),
                "{junk}"
            );
        }
        // Nonce and verifier differ per state; the verifier is a valid PKCE verifier.
        let (state2, _) = key.start(CODE, 1000);
        assert_ne!(key.nonce(&state), key.nonce(&state2));
        assert_eq!(key.verifier(&state).len(), 43);
    }

    #[test]
    fn callbacks_parse() {
        let cookies = format!("a=1; {}=xyz; b=2", cookie_name(CODE));
        let q = format!("code=abc&state={CODE}.5.m%3D&iss=x");
        assert_eq!(
            Callback::parse(&q, &cookies),
            Ok(Callback::Code {
                code: "abc".into(),
                state: format!("{CODE}.5.m="),
                binding: "xyz".into()
            })
        );
        assert_eq!(
            Callback::parse("error=access_denied&error_description=no+thanks", ""),
            Ok(Callback::Error {
                error: "access_denied".into(),
                description: "no thanks".into()
            })
        );
        assert_eq!(Callback::parse("code=abc", ""), Err(Refused::BadState));
        assert_eq!(Callback::parse("state=s", ""), Err(Refused::NoCode));
        assert_eq!(cookie("x=1;y=2", "y"), Some("2"));
        // Oversized input is refused whole, never cut (the fuzzer found a cut state).
        let long = format!("code=c&state={}", "a".repeat(MAX_INPUT));
        assert_eq!(Callback::parse(&long, ""), Err(Refused::BadState));
        assert_eq!(
            cookie(&format!("y=2; {}", "z".repeat(MAX_INPUT)), "y"),
            None
        );
        assert_eq!(cookie("x", "x"), None);
    }
}

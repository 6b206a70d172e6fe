//! Linking keys by signing in with a real OpenID provider: `oidc-provider` from the npm
//! registry on loopback (over TLS, its own CA given to boxd as `identity.ca_file`), driven like
//! a browser by `tests/fixtures/oidc_login.py` (redirects followed, cookies kept, the
//! provider's login and consent forms submitted); the key's owner then reconnects with OpenSSH
//! and is in. A second key through the same login lands in the same account. Refused, with
//! nothing linked: a changed `state`, a callback without the browser's cookie, a replayed
//! callback, an expired registration link, an ID token signed by another key (same `kid` or an
//! unknown one), for another audience, or expired, an email outside the allowed domains, and
//! the provider's own refusal. A provider that rotates its key is followed (its key set is
//! read again for the unknown `kid`).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use boxd_test_support::{Proc, fingerprint, run};
use boxd_tests::at::{At, LOBBY, expired_link, key};
use boxd_tests::ready_field as field;
use serde_json::Value;

const SIGNIN: At = At {
    ip: "127.0.44.4",
    https: 30449,
    ssh: 30225,
};
const PROVIDER_PORT: u16 = 30461;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"))
}

fn openssl(dir: &Path, args: &[&str]) {
    let (status, _, err) = run(Command::new("openssl").current_dir(dir).args(args));
    assert_eq!(status, 0, "openssl {args:?}: {err}");
}

/// A CA and a certificate for 127.0.0.1 signed by it, for the provider: (ca, cert, key).
fn provider_cert(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-days", "2", "-subj", "/CN=boxd test IdP CA"]);
    ca.extend(["-keyout", "idp-ca.key", "-out", "idp-ca.pem"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "idp.key",
        "-out",
        "idp.csr",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("idp.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "idp.csr",
            "-CA",
            "idp-ca.pem",
            "-CAkey",
            "idp-ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "idp.ext",
            "-out",
            "idp.pem",
        ],
    );
}

/// Starts the provider; returns it once it listens.
fn provider(dir: &Path, redirect: &str) -> Proc {
    let mut child = Command::new("node")
        .current_dir(fixtures().join("oidc"))
        .arg("provider.mjs")
        .arg(PROVIDER_PORT.to_string())
        .arg(dir.join("idp.pem"))
        .arg(dir.join("idp.key"))
        .args(["boxd-test", "test-client-secret", redirect])
        .arg(dir.join("mode"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node (ops/test installs it and oidc-provider)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().map(Result::unwrap).unwrap_or_default();
    assert!(first.starts_with("ready "), "the provider said {first:?}");
    std::thread::spawn(move || {
        lines.for_each(|l| eprintln!("provider: {}", l.unwrap_or_default()))
    });
    Proc(child)
}

struct Browser<'a> {
    cas: [String; 2],
    dir: &'a Path,
}

impl Browser<'_> {
    /// Signs in as `login` from `/register/CODE/login`: the callback's page as JSON, or with
    /// `stop`, the callback URL and the cookie that would go with it.
    fn sign_in(&self, code: &str, login: &str, stop: bool) -> Value {
        let start = SIGNIN.url("", &format!("/register/{code}/login"));
        let mut cmd = Command::new("python3");
        cmd.arg(fixtures().join("oidc_login.py"))
            .args([&start, login])
            .args(["--ca", &self.cas[0], "--ca", &self.cas[1]])
            .args(["--resolve", &format!("boxd.test:{LOBBY}")]);
        if stop {
            cmd.arg("--stop");
        }
        let (status, out, err) = run(cmd.current_dir(self.dir));
        assert_eq!(status, 0, "oidc_login.py: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Opens a callback URL with `cookie` (may be empty): (status, page).
    fn callback(&self, url: &str, cookie: &str) -> (u16, String) {
        let header = format!("Cookie: {cookie}");
        let extra: &[&str] = if cookie.is_empty() {
            &[]
        } else {
            &["-H", &header]
        };
        SIGNIN.curl(&self.cas[0], url, extra)
    }
}

/// The registration code an unknown key is given, after checking the lobby names the provider.
fn code_for(key: &Path) -> String {
    let (status, _, err) = SIGNIN.lobby(key, &["whoami"]);
    assert_eq!(status, 1, "{err}");
    assert!(err.contains("sign in with Test ID"), "{err}");
    SIGNIN.link_for(key).1
}

fn linked(key: &Path) -> bool {
    SIGNIN.lobby(key, &["whoami"]).0 == 0
}

#[test]
fn keys_are_linked_by_signing_in_with_a_real_openid_provider() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    provider_cert(d);
    std::fs::write(d.join("client-secret"), "test-client-secret\n").unwrap();
    let redirect = SIGNIN.url("", "/register/callback");
    let _idp = provider(d, &redirect);
    let identity = format!(
        "\n[identity]\nissuer = \"https://127.0.0.1:{PROVIDER_PORT}\"\nclient_id = \"boxd-test\"\n\
         client_secret_file = \"{}\"\nallowed_email_domains = [\"example.test\"]\n\
         display_name = \"Test ID\"\nca_file = \"{}\"\n",
        d.join("client-secret").display(),
        d.join("idp-ca.pem").display()
    );
    let (node, ready, _data) = SIGNIN.start_with(d, &identity);
    let browser = Browser {
        cas: [
            field(&ready, "ca").to_owned(),
            d.join("idp-ca.pem").display().to_string(),
        ],
        dir: d,
    };
    let [alice, alice2, carol, dave, erin] =
        ["alice", "alice2", "carol", "dave", "erin"].map(|n| key(d, n));
    let mode = |m: &str| std::fs::write(d.join("mode"), m).unwrap();

    // With a provider, the first key to connect does not own the cluster: it signs in too.
    let code = code_for(&alice);
    let (status, page) = SIGNIN.curl(
        &browser.cas[0],
        &SIGNIN.url("", &format!("/register/{code}")),
        &[],
    );
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(&format!(
            "href=\"/register/{code}/login\">Sign in with Test ID</a>"
        )),
        "{page}"
    );
    let done = browser.sign_in(&code, "alice", false);
    assert_eq!(done["status"], 200, "{done}");
    let body = done["body"].as_str().unwrap();
    assert!(body.contains("Linked: reconnect with ssh"), "{body}");
    assert!(
        body.contains("alice@example.test") && body.contains(&fingerprint(&alice)),
        "{body}"
    );
    let me = SIGNIN.whoami(&alice);
    assert_eq!(
        (me["account"].as_str(), me["owner"].as_bool()),
        (Some("alice"), Some(false)),
        "{me}"
    );

    // A second key through the same login: the same account.
    let code2 = code_for(&alice2);
    let done = browser.sign_in(&code2, "alice", false);
    assert_eq!(done["status"], 200, "{done}");
    assert_eq!(SIGNIN.whoami(&alice2)["id"], me["id"]);

    // Refused, nothing linked: a changed state, no cookie, tampered ID tokens.
    let carol_code = code_for(&carol);
    let stopped = browser.sign_in(&carol_code, "carol", true);
    let (url, cookie) = (
        stopped["callback"].as_str().unwrap(),
        stopped["cookie"].as_str().unwrap(),
    );
    assert!(
        cookie.starts_with(&format!("boxd-signin-{carol_code}=")),
        "{stopped}"
    );
    // The state names another code (its last digit changed).
    let last = if carol_code.ends_with('0') { "1" } else { "0" };
    let other = format!("{}{last}", &carol_code[..31]);
    let changed = url.replace(&format!("state={carol_code}"), &format!("state={other}"));
    assert_ne!(changed, url);
    let (status, page) = browser.callback(&changed, cookie);
    assert!(
        status == 400 && page.contains("was not started here"),
        "{status} {page}"
    );
    let (status, page) = browser.callback(url, "");
    assert!(
        status == 400 && page.contains("was not started here"),
        "{status} {page}"
    );
    let (status, page) = browser.callback(
        url,
        &format!("boxd-signin-{carol_code}=AAAAAAAAAAAAAAAAAAAAAA"),
    );
    assert!(
        status == 400 && page.contains("was not started here"),
        "another browser's: {page}"
    );
    assert!(!linked(&carol));
    for (m, why) in [
        ("foreign-key", "signature"),
        ("unknown-kid", "key"),
        ("wrong-audience", "audience"),
        ("expired", "xpired"),
    ] {
        let stopped = browser.sign_in(&carol_code, "carol", true);
        mode(m);
        let (status, page) = browser.callback(
            stopped["callback"].as_str().unwrap(),
            stopped["cookie"].as_str().unwrap(),
        );
        mode("");
        assert!(
            status == 403 && page.contains("could not be verified"),
            "{m}: {status} {page}"
        );
        assert!(
            page.to_lowercase().contains(&why.to_lowercase()),
            "{m}: {page}"
        );
        assert!(!linked(&carol), "{m} linked nothing");
    }

    // The provider rotates its signing key: boxd reads its key set again for the unknown kid
    // (at most once per 10 s, so past that since the last read) and accepts the token.
    std::thread::sleep(std::time::Duration::from_secs(11));
    mode("rotated");
    let frank = key(d, "frank");
    let frank_code = code_for(&frank);
    let done = browser.sign_in(&frank_code, "frank", false);
    mode("");
    assert_eq!(done["status"], 200, "{done}");
    assert_eq!(SIGNIN.whoami(&frank)["account"], "frank");

    // The same flow untampered links; replaying its callback is refused and changes nothing.
    let stopped = browser.sign_in(&carol_code, "carol", true);
    let (url, cookie) = (
        stopped["callback"].as_str().unwrap(),
        stopped["cookie"].as_str().unwrap(),
    );
    let (status, page) = browser.callback(url, cookie);
    assert!(
        status == 200 && page.contains("a new account, <code>carol</code>"),
        "{page}"
    );
    let carol_me = SIGNIN.whoami(&carol);
    let (status, page) = browser.callback(url, cookie);
    assert!(
        status == 404 && page.contains("already used"),
        "replayed: {status} {page}"
    );
    assert_eq!(SIGNIN.whoami(&carol), carol_me);

    // An email outside the allowed domains.
    let dave_code = code_for(&dave);
    let done = browser.sign_in(&dave_code, "out-dave", false);
    let body = done["body"].as_str().unwrap();
    assert_eq!(done["status"], 403, "{body}");
    assert!(
        body.contains("only takes people whose email is at example.test"),
        "{body}"
    );
    assert!(!linked(&dave));
    // The provider's own refusal (the person cancelled).
    let stopped = browser.sign_in(&dave_code, "dave", true);
    let url = stopped["callback"].as_str().unwrap();
    let state = url
        .split("state=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let cancelled = SIGNIN.url(
        "",
        &format!("/register/callback?error=access_denied&state={state}"),
    );
    let (status, page) = browser.callback(&cancelled, stopped["cookie"].as_str().unwrap());
    assert!(status == 403 && page.contains("access_denied"), "{page}");
    assert!(!linked(&dave));

    // An expired registration link cannot start a sign-in.
    let erin_code = expired_link(&node, &erin);
    let login = SIGNIN.url("", &format!("/register/{erin_code}/login"));
    let (status, page) = SIGNIN.curl(&browser.cas[0], &login, &[]);
    assert!(status == 410 && page.contains("expired"), "{status} {page}");
    assert!(!linked(&erin));
}

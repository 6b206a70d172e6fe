//! Registration without an identity provider, end to end with OpenSSH and curl: an unknown key
//! gets a link; the link opens a page (through the HTTPS front door, at the zone's own name)
//! that shows the key and how it gets linked; the cluster's owner lists waiting keys and
//! approves one as a new account or into an existing one, from the lobby or `boxd admin`; the
//! key's owner reconnects and is in. Refused, with nothing linked: a non-owner's approval, a
//! used code, an expired one, a taken account name; hostile paths get escaped 404 pages.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use boxd_test_support::{SSH_OPTS, boxd_bin, fingerprint, keygen, run};
use boxd_tests::{Node, UP, now_ms, ready_field as field, write, write_config};
use serde_json::{Value, json};

const IP: &str = "127.0.44.1";
const HTTPS_PORT: u16 = 30443;
const SSH_PORT: u16 = 30222;
const LOBBY: &str = "127.77.0.1";

fn start(dir: &Path) -> (Node, String, PathBuf) {
    let cfg = write_config(dir, "reg", &format!("{IP}:7000"), "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            &format!("[https]\nlisten = \"{IP}:8443\"\nredirect_listen = \"{IP}:8080\""),
            &format!(
                "[https]\nlisten = \"0.0.0.0:{HTTPS_PORT}\"\nredirect_listen = \"0.0.0.0:{}\"",
                HTTPS_PORT + 1
            ),
        )
        .replace(
            &format!("[ssh]\nlisten = \"{IP}:2222\""),
            &format!("[ssh]\nlisten = \"0.0.0.0:{SSH_PORT}\"\nauth_timeout_secs = 5"),
        );
    std::fs::write(&cfg, text).unwrap();
    let data = dir.join("data");
    let node = Node::start(&UP, &data, &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    (node, ready, data)
}

fn key(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    keygen(&p);
    p
}

/// `ssh -p SSH_PORT -i key LOBBY args…`: (exit status, stdout, stderr).
fn lobby(key: &Path, args: &[&str]) -> (i32, String, String) {
    run(Command::new("ssh")
        .args(["-p", &SSH_PORT.to_string(), "-i"])
        .arg(key)
        .args(SSH_OPTS)
        .args(["-o", "ConnectTimeout=10", LOBBY])
        .args(args)
        .stdin(Stdio::null()))
}

/// The registration link an unknown key is given, and its code.
fn link_for(key: &Path) -> (String, String) {
    let (status, out, err) = lobby(key, &["whoami"]);
    assert_eq!((status, out.as_str()), (1, ""), "{err}");
    let link = err
        .split_whitespace()
        .find(|w| w.contains("/register/"))
        .unwrap_or_else(|| panic!("no link in {err:?}"))
        .to_owned();
    let code = link.rsplit('/').next().unwrap().to_owned();
    (link, code)
}

/// curl `url` (whose host is resolved to the lobby) with the local CA: (status, body).
fn curl(ca: &str, url: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert", ca, "-o", "-"])
        .args(["-w", "\n%{http_code}", "--resolve"])
        .arg(format!("boxd.test:{HTTPS_PORT}:{LOBBY}"))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

fn whoami(key: &Path) -> Value {
    let (status, out, err) = lobby(key, &["whoami", "--json"]);
    assert_eq!(status, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn admin_cli(data: &Path, args: &[&str]) -> (i32, String, String) {
    run(Command::new(boxd_bin())
        .args(["admin", "--data-dir"])
        .arg(data)
        .args(args))
}

#[test]
fn the_owner_approves_keys_from_their_registration_links() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ready, data) = start(dir.path());
    let ca = field(&ready, "ca").to_owned();
    let [alice, bob, carol, dave, erin, frank] =
        ["alice", "bob", "carol", "dave", "erin", "frank"].map(|n| key(dir.path(), n));

    let me = whoami(&alice);
    assert_eq!(
        (me["account"].as_str(), me["owner"].as_bool()),
        (Some("owner"), Some(true))
    );

    // The link opens a page that shows the key and how it gets linked.
    let (link, code) = link_for(&bob);
    assert_eq!(
        link,
        format!("https://boxd.test:{HTTPS_PORT}/register/{code}")
    );
    let (status, page) = curl(&ca, &link, &[]);
    assert_eq!(status, 200, "{page}");
    for needle in [
        fingerprint(&bob).as_str(),
        "ssh-ed25519",
        &format!("ssh -p {SSH_PORT} boxd.test approve {code}"),
        "<style>",
    ] {
        assert!(page.contains(needle), "{needle:?} not in {page}");
    }
    assert!(!page.contains("<script"), "{page}");
    // The same page over HTTP/2; HEAD has no body; other methods are refused.
    let (status, page2) = curl(&ca, &link, &["--http2"]);
    assert_eq!((status, page2.contains(&fingerprint(&bob))), (200, true));
    let (status, body) = curl(&ca, &link, &["-I"]);
    assert!(status == 200 && !body.contains("<html"), "{body}");
    assert_eq!(curl(&ca, &link, &["-X", "POST"]).0, 405);

    // Hostile or unknown paths: escaped pages, nothing looked up for a malformed code.
    for (path, want) in [
        ("/register/%3Cscript%3Ealert(1)%3C/script%3E", 404),
        ("/register/00000000000000000000000000000000", 404),
        ("/register/", 404),
        ("/admin", 404),
    ] {
        let (status, body) = curl(&ca, &format!("https://boxd.test:{HTTPS_PORT}{path}"), &[]);
        assert_eq!(status, want, "{path}: {body}");
        assert!(!body.contains("<script"), "{path}: {body}");
    }
    let (status, body) = curl(&ca, &format!("https://boxd.test:{HTTPS_PORT}/"), &[]);
    assert!(status == 200 && body.contains("new --name=myapp"), "{body}");

    // Only the owner approves. Carol's key becomes an account of its own first...
    let (_, carol_code) = link_for(&carol);
    let (status, out, err) = lobby(&alice, &["registrations"]);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains(&code) && out.contains(&carol_code), "{out}");
    let (status, out, err) = lobby(&alice, &["approve", &carol_code, "--name=carol"]);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("to a new account carol"), "{out}");
    assert_eq!(whoami(&carol)["owner"], false);
    // ... and cannot approve bob, list, or learn anything; bob stays out.
    for args in [&["approve", code.as_str()][..], &["registrations"][..]] {
        let (status, _, err) = lobby(&carol, args);
        assert_eq!(status, 1, "{args:?}: {err}");
        assert!(err.contains("only the cluster's owner"), "{err}");
    }
    assert_eq!(lobby(&bob, &["whoami"]).0, 1, "bob is still unknown");

    // The owner approves bob as a new account; bob reconnects and is in.
    let (status, out, err) = lobby(&alice, &["registrations", "--json"]);
    assert_eq!(status, 0, "{err}");
    let waiting: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(waiting.as_array().unwrap().len(), 1, "{waiting}");
    assert_eq!(waiting[0]["fingerprint"], fingerprint(&bob));
    let (status, out, err) = lobby(&alice, &["approve", &code]);
    assert_eq!(status, 0, "{err}");
    let account = format!("user-{}", &code[..8]);
    assert!(out.contains(&account), "{out}");
    let bob_me = whoami(&bob);
    assert_eq!(
        (bob_me["account"].as_str(), bob_me["owner"].as_bool()),
        (Some(account.as_str()), Some(false))
    );
    // The code is spent: approving it again is refused and its page is gone.
    let (status, _, err) = lobby(&alice, &["approve", &code]);
    assert!(status == 1 && err.contains("no registration link"), "{err}");
    assert_eq!(curl(&ca, &link, &[]).0, 404);

    // A second key of the same person joins bob's account.
    let (_, dave_code) = link_for(&dave);
    let (status, _, err) = lobby(&alice, &["approve", &dave_code, "--name=carol"]);
    assert!(status == 1 && err.contains("taken"), "a taken name: {err}");
    assert_eq!(lobby(&dave, &["whoami"]).0, 1, "nothing was linked");
    let (status, _, err) = lobby(&alice, &["approve", &dave_code, "--to-account=nobody"]);
    assert!(status == 1 && err.contains("no account nobody"), "{err}");
    let to = format!("--to-account={account}");
    let (status, _, err) = lobby(&alice, &["approve", &dave_code, &to]);
    assert_eq!(status, 0, "{err}");
    assert_eq!(whoami(&dave)["id"], bob_me["id"]);

    // An expired link: its page says so and it cannot be approved.
    let erin_pub = std::fs::read_to_string(erin.with_extension("pub")).unwrap();
    let erin_code = "e".repeat(32);
    write(
        &node,
        json!({"type": "create_registration", "code": erin_code,
               "fingerprint": fingerprint(&erin), "public_key": erin_pub.trim(),
               "at": now_ms() - 7_200_000, "expires_at": now_ms() - 3_600_000}),
    );
    let (status, body) = curl(
        &ca,
        &format!("https://boxd.test:{HTTPS_PORT}/register/{erin_code}"),
        &[],
    );
    assert!(status == 410 && body.contains("expired"), "{body}");
    let (status, _, err) = lobby(&alice, &["approve", &erin_code]);
    assert!(status == 1 && err.contains("expired"), "{err}");
    assert_eq!(lobby(&erin, &["whoami"]).0, 1, "nothing was linked");

    // The operator approves from the node itself.
    let (_, frank_code) = link_for(&frank);
    let (status, out, err) = admin_cli(&data, &["registrations"]);
    assert_eq!(status, 0, "{err}");
    assert!(
        out.contains(&frank_code) && !out.contains(&erin_code),
        "{out}"
    );
    let (status, out, err) = admin_cli(
        &data,
        &["registrations", "approve", &frank_code, "--name", "frank"],
    );
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("frank"), "{out}");
    assert_eq!(whoami(&frank)["account"], "frank");
    let (status, _, err) = admin_cli(&data, &["registrations", "approve", &frank_code]);
    assert!(status == 1 && err.contains("no registration link"), "{err}");
}

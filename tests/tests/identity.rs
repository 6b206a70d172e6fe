//! Identity end to end with OpenSSH, curl and PyJWT.
//!
//! Registration without an identity provider: an unknown key gets a link; the link opens a
//! page (through the HTTPS front door, at the zone's own name) that shows the key and how it
//! gets linked; the cluster's owner lists waiting keys and approves one as a new account or
//! into an existing one, from the lobby or `boxd admin`; the key's owner reconnects and is in.
//! Refused, with nothing linked: a non-owner's approval, a used code, an expired one, a taken
//! account name; hostile paths get escaped 404 pages.
//!
//! API tokens: `token create` prints a JWT that PyJWT verifies against the key set published
//! at `https://api.<zone>/.well-known/jwks.json`, with the scope asked for; `token ls`,
//! `token rm`; a key rotation keeps old tokens verifiable.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use boxd_test_support::{Proc, agent_bin, fingerprint, run};
use boxd_tests::at::{At, LOBBY, admin_cli, expired_link, key};
use boxd_tests::{now_ms, ready_field as field, running_vm, spawn_agent};
use serde_json::{Value, json};

const REGISTRATION: At = At {
    ip: "127.0.44.1",
    https: 30443,
    ssh: 30222,
};
const TOKENS: At = At {
    ip: "127.0.44.2",
    https: 30445,
    ssh: 30223,
};

#[test]
fn the_owner_approves_keys_from_their_registration_links() {
    let dir = tempfile::tempdir().unwrap();
    let at = REGISTRATION;
    let (node, ready, data) = at.start(dir.path());
    let ca = field(&ready, "ca").to_owned();
    let [alice, bob, carol, dave, erin, frank] =
        ["alice", "bob", "carol", "dave", "erin", "frank"].map(|n| key(dir.path(), n));

    let me = at.whoami(&alice);
    assert_eq!(
        (me["account"].as_str(), me["owner"].as_bool()),
        (Some("owner"), Some(true))
    );

    // The link opens a page that shows the key and how it gets linked.
    let (link, code) = at.link_for(&bob);
    assert_eq!(link, at.url("", &format!("/register/{code}")));
    let (status, page) = at.curl(&ca, &link, &[]);
    assert_eq!(status, 200, "{page}");
    for needle in [
        fingerprint(&bob).as_str(),
        "ssh-ed25519",
        &format!("ssh -p {} boxd.test approve {code}", at.ssh),
        "<style>",
    ] {
        assert!(page.contains(needle), "{needle:?} not in {page}");
    }
    assert!(!page.contains("<script"), "{page}");
    // The same page over HTTP/2; HEAD has no body; other methods are refused.
    let (status, page2) = at.curl(&ca, &link, &["--http2"]);
    assert_eq!((status, page2.contains(&fingerprint(&bob))), (200, true));
    let (status, body) = at.curl(&ca, &link, &["-I"]);
    assert!(status == 200 && !body.contains("<html"), "{body}");
    assert_eq!(at.curl(&ca, &link, &["-X", "POST"]).0, 405);

    // Hostile or unknown paths: escaped pages, nothing looked up for a malformed code.
    for (path, want) in [
        ("/register/%3Cscript%3Ealert(1)%3C/script%3E", 404),
        ("/register/00000000000000000000000000000000", 404),
        ("/register/", 404),
        ("/admin", 404),
    ] {
        let (status, body) = at.curl(&ca, &at.url("", path), &[]);
        assert_eq!(status, want, "{path}: {body}");
        assert!(!body.contains("<script"), "{path}: {body}");
    }
    let (status, body) = at.curl(&ca, &at.url("", "/"), &[]);
    assert!(status == 200 && body.contains("new --name=myapp"), "{body}");

    // Only the owner approves. Carol's key becomes an account of its own first...
    let (_, carol_code) = at.link_for(&carol);
    let (status, out, err) = at.lobby(&alice, &["registrations"]);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains(&code) && out.contains(&carol_code), "{out}");
    let (status, out, err) = at.lobby(&alice, &["approve", &carol_code, "--name=carol"]);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("to a new account carol"), "{out}");
    assert_eq!(at.whoami(&carol)["owner"], false);
    // ... and cannot approve bob, list, or learn anything; bob stays out.
    for args in [&["approve", code.as_str()][..], &["registrations"][..]] {
        let (status, _, err) = at.lobby(&carol, args);
        assert_eq!(status, 1, "{args:?}: {err}");
        assert!(err.contains("only the cluster's owner"), "{err}");
    }
    assert_eq!(at.lobby(&bob, &["whoami"]).0, 1, "bob is still unknown");

    // The owner approves bob as a new account; bob reconnects and is in.
    let (status, out, err) = at.lobby(&alice, &["registrations", "--json"]);
    assert_eq!(status, 0, "{err}");
    let waiting: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(waiting.as_array().unwrap().len(), 1, "{waiting}");
    assert_eq!(waiting[0]["fingerprint"], fingerprint(&bob));
    let (status, out, err) = at.lobby(&alice, &["approve", &code]);
    assert_eq!(status, 0, "{err}");
    let account = format!("user-{}", &code[..8]);
    assert!(out.contains(&account), "{out}");
    let bob_me = at.whoami(&bob);
    assert_eq!(
        (bob_me["account"].as_str(), bob_me["owner"].as_bool()),
        (Some(account.as_str()), Some(false))
    );
    // The code is spent: approving it again is refused and its page is gone.
    let (status, _, err) = at.lobby(&alice, &["approve", &code]);
    assert!(status == 1 && err.contains("no registration link"), "{err}");
    assert_eq!(at.curl(&ca, &link, &[]).0, 404);

    // A second key of the same person joins bob's account.
    let (_, dave_code) = at.link_for(&dave);
    let (status, _, err) = at.lobby(&alice, &["approve", &dave_code, "--name=carol"]);
    assert!(status == 1 && err.contains("taken"), "a taken name: {err}");
    assert_eq!(at.lobby(&dave, &["whoami"]).0, 1, "nothing was linked");
    let (status, _, err) = at.lobby(&alice, &["approve", &dave_code, "--to-account=nobody"]);
    assert!(status == 1 && err.contains("no account nobody"), "{err}");
    let to = format!("--to-account={account}");
    let (status, _, err) = at.lobby(&alice, &["approve", &dave_code, &to]);
    assert_eq!(status, 0, "{err}");
    assert_eq!(at.whoami(&dave)["id"], bob_me["id"]);

    // An expired link: its page says so and it cannot be approved.
    let erin_code = expired_link(&node, &erin);
    let (status, body) = at.curl(&ca, &at.url("", &format!("/register/{erin_code}")), &[]);
    assert!(status == 410 && body.contains("expired"), "{body}");
    let (status, _, err) = at.lobby(&alice, &["approve", &erin_code]);
    assert!(status == 1 && err.contains("expired"), "{err}");
    assert_eq!(at.lobby(&erin, &["whoami"]).0, 1, "nothing was linked");

    // The operator approves from the node itself.
    let (_, frank_code) = at.link_for(&frank);
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
    assert_eq!(at.whoami(&frank)["account"], "frank");
    let (status, _, err) = admin_cli(&data, &["registrations", "approve", &frank_code]);
    assert!(status == 1 && err.contains("no registration link"), "{err}");
}

/// Checks `token` the way a client of ours would: PyJWT with the key set `jwks` (JSON), the
/// audience and issuer; prints the claims as JSON, or the error.
fn pyjwt(token: &str, jwks: &str) -> Result<Value, String> {
    const CHECK: &str = r#"
import json, sys, jwt
token, jwks = sys.argv[1], json.loads(sys.argv[2])
header = jwt.get_unverified_header(token)
keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
try:
    key = keys[header["kid"]]
    claims = jwt.decode(token, key=key, algorithms=["EdDSA"], audience="boxd-api",
                        issuer="https://api.boxd.test")
except Exception as e:
    print(type(e).__name__, e, file=sys.stderr)
    sys.exit(1)
print(json.dumps(claims))
"#;
    let (status, out, err) = run(Command::new("python3").args(["-c", CHECK, token, jwks]));
    if status == 0 {
        Ok(serde_json::from_str(&out).unwrap())
    } else {
        Err(err)
    }
}

#[test]
fn tokens_are_jwts_anyone_can_check_against_the_published_keys() {
    let dir = tempfile::tempdir().unwrap();
    let at = TOKENS;
    let (node, ready, data) = at.start(dir.path());
    let ca = field(&ready, "ca").to_owned();
    let alice = key(dir.path(), "alice");
    let me = at.whoami(&alice);
    running_vm(&node, &me["id"], "web", 80, "10.0.0.2");
    let jwks_url = at.url("api", "/.well-known/jwks.json");

    // A token limited to one VM, read-only, ten minutes: the JWT alone on stdout.
    let (status, token, err) = at.lobby(
        &alice,
        &[
            "token",
            "create",
            "--ttl=10m",
            "--vm=web",
            "--read-only",
            "--label=ci",
        ],
    );
    assert_eq!(status, 0, "{err}");
    let token = token.trim().to_owned();
    assert!(err.contains("VMs web, read-only"), "{err}");
    let (status, jwks) = at.curl(&ca, &jwks_url, &[]);
    assert_eq!(status, 200, "{jwks}");
    let claims = pyjwt(&token, &jwks).unwrap();
    assert_eq!(claims["sub"], me["id"]);
    assert_eq!(claims["vms"], json!(["web"]));
    assert_eq!(claims["ro"], true);
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!((599..=600).contains(&ttl), "{claims}");
    // Over HTTP/2 the key set is the same document.
    assert_eq!(at.curl(&ca, &jwks_url, &["--http2"]), (200, jwks.clone()));

    // A token whose claims were widened keeps its signature: PyJWT refuses it.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut widened = claims.clone();
    widened["vms"] = json!([]);
    widened["ro"] = json!(false);
    parts[1] = b64url(&widened.to_string());
    let err = pyjwt(&parts.join("."), &jwks).unwrap_err();
    assert!(err.contains("InvalidSignature"), "{err}");

    // `token ls` shows it; `token rm` revokes it.
    let (status, out, err) = at.lobby(&alice, &["token", "ls", "--json"]);
    assert_eq!(status, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], claims["jti"]);
    assert_eq!(listed[0]["label"], "ci");
    let id = claims["jti"].as_str().unwrap();
    assert_eq!(at.lobby(&alice, &["token", "rm", id]).0, 0);
    let (_, out, _) = at.lobby(&alice, &["token", "ls", "--json"]);
    assert_eq!(out.trim(), "[]");
    let (status, _, err) = at.lobby(&alice, &["token", "rm", id]);
    assert!(status == 1 && err.contains("no token"), "{err}");

    // Refused, nothing made: a VM that is not ours, a lifetime past 90 days, junk.
    for (args, want, needle) in [
        (&["token", "create", "--vm=nope"][..], 1, "no VM named nope"),
        (&["token", "create", "--ttl=91d"][..], 2, "90d"),
        (&["token", "create", "--ttl=0"][..], 2, "1s"),
        (&["token", "rm", "not-an-id"][..], 2, "not a token id"),
    ] {
        let (status, out, err) = at.lobby(&alice, args);
        assert_eq!((status, out.as_str()), (want, ""), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let (_, out, _) = at.lobby(&alice, &["token", "ls", "--json"]);
    assert_eq!(out.trim(), "[]");

    // Rotation: new tokens are signed by the new key; the old key still verifies.
    let (status, _, err) = at.lobby(&alice, &["token", "create"]);
    assert_eq!(status, 0, "{err}");
    let (_, old_token, _) = at.lobby(&alice, &["token", "create", "--ttl=1h"]);
    let (status, out, err) = admin_cli(&data, &["token-keys", "rotate"]);
    assert_eq!(status, 0, "{err}");
    let kid = out.trim().rsplit(' ').next().unwrap().to_owned();
    let (_, new_token, _) = at.lobby(&alice, &["token", "create"]);
    let (_, jwks) = at.curl(&ca, &jwks_url, &[]);
    let set: Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(set["keys"].as_array().unwrap().len(), 2, "{set}");
    assert!(pyjwt(old_token.trim(), &jwks).is_ok());
    assert!(pyjwt(new_token.trim(), &jwks).is_ok());
    let header: Value =
        serde_json::from_slice(&base64_url(new_token.trim().split('.').next().unwrap())).unwrap();
    assert_eq!(header["kid"], kid);
    assert_eq!(header["alg"], "EdDSA");
}

fn b64url(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn base64_url(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

const API: At = At {
    ip: "127.0.44.3",
    https: 30447,
    ssh: 30224,
};

/// Plays the worker for every VM the scheduler places on the [`fake_worker`] until `stop`:
/// reports it running when it should run, stopped when it should not.
fn play_worker(socket: &Path, worker: Value, stop: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    let mut admin = boxd_tests::Admin::connect(socket);
    while !stop.load(Ordering::Relaxed) {
        let vms = admin.ok(&json!({"op": "vms"}));
        for v in vms.as_array().into_iter().flatten() {
            let observed = match (v["desired"].as_str(), v["observed"].as_str()) {
                (Some("running"), Some(o)) if o != "running" => "running",
                (Some("stopped"), Some("running")) => "stopped",
                _ => continue,
            };
            if v["worker"] != worker {
                continue;
            }
            let report = json!({"type": "report_vm", "vm": v["id"], "worker": worker,
                   "observed": observed, "private_ip": "10.0.0.9", "at": now_ms()});
            admin.ok(&json!({"op": "write", "command": report}));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_grpc_client_none_of_our_code_generates_uses_the_api_with_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let at = API;
    let (node, ready, _data) = at.start(dir.path());
    let ca = field(&ready, "ca").to_owned();
    let alice = key(dir.path(), "alice");
    let me = at.whoami(&alice);
    // `other` is served by a real guest agent (on loopback), for Exec.
    let cluster_key = dir.path().join("agent.pub");
    let public = node.admin().ok(&json!({"op": "agent-key"}))["public_key"].clone();
    std::fs::write(&cluster_key, public.as_str().unwrap()).unwrap();
    let agent_ip = "127.0.44.33";
    let _agent = Proc(spawn_agent(
        Command::new(agent_bin())
            .args(["--listen", &format!("{agent_ip}:2200"), "--authorized-key"])
            .arg(&cluster_key),
    ));
    running_vm(&node, &me["id"], "other", 80, agent_ip);
    let token = |args: &[&str]| {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let (status, out, err) = at.lobby(&alice, &all);
        assert_eq!(status, 0, "{err}");
        out.trim().to_owned()
    };
    let revoked = token(&[]);
    let claims: Value =
        serde_json::from_slice(&base64_url(revoked.split('.').nth(1).unwrap())).unwrap();
    assert_eq!(
        at.lobby(&alice, &["token", "rm", claims["jti"].as_str().unwrap()])
            .0,
        0
    );
    let expired = token(&["--ttl=1s"]);
    // The same claims signed by a key this cluster does not know.
    let stranger = boxd_controlplane::tokens::SigningKey::generate().unwrap();
    let foreign = stranger
        .sign(&serde_json::from_value(claims.clone()).unwrap())
        .unwrap();
    let tokens = json!({
        "full": token(&["--ttl=1h"]),
        "read_only": token(&["--read-only"]),
        "scoped": token(&["--vm=other"]),
        "scoped_web": token(&["--vm=other", "--read-only"]),
        "revoked": revoked,
        "expired": expired,
        "foreign": foreign,
    });
    std::thread::sleep(Duration::from_millis(1100));

    let worker = boxd_tests::fake_worker(&node);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let socket = node.socket();
    let seen: Value = std::thread::scope(|s| {
        s.spawn(|| play_worker(&socket, worker, &stop));
        let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane/api/proto");
        let client = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/api_client.py");
        let (status, out, err) = run(Command::new("python3").args([
            client,
            proto,
            &format!("{LOBBY}:{}", at.https),
            &ca,
            &tokens.to_string(),
        ]));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    });
    eprintln!("{seen:#}");

    assert!(
        seen["services"]
            .as_array()
            .unwrap()
            .contains(&json!("boxd.api.v1.Boxd")),
        "{seen}"
    );
    assert_eq!(seen["whoami"], json!(["OK", "owner"]));
    let mut watches = vec![json!("OK"); 15];
    watches.push(json!("RESOURCE_EXHAUSTED"));
    assert_eq!(seen["watches"], json!(watches), "16 watches per account");
    assert_eq!(seen["create"], json!(["OK", "VM_STATE_RUNNING"]));
    assert_eq!(seen["list"], json!(["other", "web"]));
    assert_eq!(
        seen["get"],
        json!(["OK", "web", format!("ssh -p {} web.boxd.test", at.ssh)])
    );
    for (case, code) in [
        ("no token", "UNAUTHENTICATED"),
        ("garbage", "UNAUTHENTICATED"),
        ("expired", "UNAUTHENTICATED"),
        ("revoked", "UNAUTHENTICATED"),
        ("foreign", "UNAUTHENTICATED"),
        ("read-only delete", "PERMISSION_DENIED"),
        ("read-only widens", "PERMISSION_DENIED"),
        ("out of scope", "PERMISSION_DENIED"),
        ("bad name", "INVALID_ARGUMENT"),
        ("name taken", "ALREADY_EXISTS"),
        ("no such vm", "NOT_FOUND"),
    ] {
        assert_eq!(seen["refused"][case], code, "{case}: {seen}");
    }
    assert_eq!(seen["scoped list"], json!(["other"]));
    assert_eq!(
        seen["still there"], "OK",
        "a refused delete deleted nothing"
    );
    assert_eq!(seen["narrower"], json!(["OK", true]));
    assert_eq!(seen["exec"], json!(["hi\n", "", [3, ""]]));
    assert_eq!(seen["exec env"], json!(["hi\n", "", [0, ""]]));
    assert_eq!(seen["exec stdin"], json!(["typed\n", "oops\n", [0, ""]]));
    assert_eq!(seen["exec read-only"], "PERMISSION_DENIED");
    assert_eq!(seen["exec out of scope"], "PERMISSION_DENIED");
    assert_eq!(seen["stop"], json!(["OK", false]));
    assert_eq!(seen["delete"], "OK");
    assert_eq!(seen["after delete"], "NOT_FOUND");
    // The watch saw the VMs there at the start, then web come, run, stop and go.
    let events = seen["events"].as_array().unwrap();
    let web: Vec<(&str, bool)> = events
        .iter()
        .filter(|e| e["name"] == "web")
        .map(|e| {
            (
                e["state"].as_str().unwrap(),
                e["deleted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "other" && e["initial"] == true),
        "{events:?}"
    );
    let pos = |want: (&str, bool)| web.iter().position(|w| *w == want);
    let running = pos(("VM_STATE_RUNNING", false)).expect("running");
    let stopped = pos(("VM_STATE_STOPPED", false)).expect("stopped");
    let deleted = web.iter().position(|w| w.1).expect("deleted");
    assert!(running < stopped && stopped < deleted, "{web:?}");
}

//! One test's node for the front-door tests (identity, sign-in): `boxd up` on its own IP,
//! with its own HTTPS and SSH ports on every address (the lobby address is shared), and the
//! clients a user would point at it: OpenSSH and curl.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use boxd_test_support::{SSH_OPTS, boxd_bin, fingerprint, keygen, run};
use serde_json::{Value, json};

use crate::{Node, UP, now_ms, write, write_config};

/// The lobby address every test's SSH and HTTPS answer on.
pub const LOBBY: &str = "127.77.0.1";

/// Where one test's node listens: its own IP for Raft, DNS and the rest, and its own HTTPS
/// and SSH ports on every address (the lobby address is shared by every test).
#[derive(Clone, Copy)]
pub struct At {
    /// Its IP (Raft, DNS).
    pub ip: &'static str,
    /// Its HTTPS port.
    pub https: u16,
    /// Its SSH port.
    pub ssh: u16,
}

impl At {
    /// `boxd up` with this test's addresses; returns the node, its ready line and data dir.
    pub fn start(self, dir: &Path) -> (Node, String, PathBuf) {
        self.start_with(dir, "")
    }

    /// Like [`At::start`], with `extra` (whole sections) added to the config.
    pub fn start_with(self, dir: &Path, extra: &str) -> (Node, String, PathBuf) {
        self.start_edited(dir, extra, &[])
    }

    /// Like [`At::start_with`], with each `(from, to)` replaced in the config first (say,
    /// `heartbeat_secs = 60`).
    pub fn start_edited(
        self,
        dir: &Path,
        extra: &str,
        edits: &[(&str, &str)],
    ) -> (Node, String, PathBuf) {
        let ip = self.ip;
        let cfg = write_config(dir, "id", &format!("{ip}:7000"), extra);
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        for (from, to) in edits {
            assert!(text.contains(from), "{from} is not in the config");
            text = text.replace(from, to);
        }
        let text = text
            .replace(
                &format!("[https]\nlisten = \"{ip}:8443\"\nredirect_listen = \"{ip}:8080\""),
                &format!(
                    "[https]\nlisten = \"0.0.0.0:{}\"\nredirect_listen = \"0.0.0.0:{}\"",
                    self.https,
                    self.https + 1
                ),
            )
            .replace(
                &format!("[ssh]\nlisten = \"{ip}:2222\""),
                &format!(
                    "[ssh]\nlisten = \"0.0.0.0:{}\"\nauth_timeout_secs = 5",
                    self.ssh
                ),
            );
        std::fs::write(&cfg, text).unwrap();
        let data = dir.join("data");
        let node = Node::start(&UP, &data, &cfg);
        let ready = node.wait_ready(Duration::from_secs(30));
        (node, ready, data)
    }

    /// `ssh -p SSH -i key LOBBY args…`: (exit status, stdout, stderr).
    pub fn lobby(self, key: &Path, args: &[&str]) -> (i32, String, String) {
        run(Command::new("ssh")
            .args(["-p", &self.ssh.to_string(), "-i"])
            .arg(key)
            .args(SSH_OPTS)
            .args(["-o", "ConnectTimeout=10", LOBBY])
            .args(args)
            .stdin(Stdio::null()))
    }

    /// The registration link an unknown key is given, and its code.
    pub fn link_for(self, key: &Path) -> (String, String) {
        let (status, out, err) = self.lobby(key, &["whoami"]);
        assert_eq!((status, out.as_str()), (1, ""), "{err}");
        let link = err
            .split_whitespace()
            .find(|w| w.contains("/register/"))
            .unwrap_or_else(|| panic!("no link in {err:?}"))
            .to_owned();
        let code = link.rsplit('/').next().unwrap().to_owned();
        (link, code)
    }

    /// `https://HOST:HTTPS/path` for a name in the zone (`""`: the zone itself).
    pub fn url(self, host: &str, path: &str) -> String {
        let dot = if host.is_empty() { "" } else { "." };
        format!("https://{host}{dot}boxd.test:{}{path}", self.https)
    }

    /// curl `url` (its host resolved to the lobby) with the local CA: (status, body).
    pub fn curl(self, ca: &str, url: &str, extra: &[&str]) -> (u16, String) {
        let host = url
            .trim_start_matches("https://")
            .split([':', '/'])
            .next()
            .unwrap();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert", ca, "-o", "-"])
            .args(["-w", "\n%{http_code}", "--resolve"])
            .arg(format!("{host}:{}:{LOBBY}", self.https))
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse().unwrap_or(0), body.to_owned())
    }

    /// `whoami --json` in the lobby with `key`.
    pub fn whoami(self, key: &Path) -> Value {
        let (status, out, err) = self.lobby(key, &["whoami", "--json"]);
        assert_eq!(status, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }
}

/// A new ed25519 key pair at `dir/name` (and `.pub`).
pub fn key(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    keygen(&p);
    p
}

/// `boxd admin --data-dir DATA args…`: (exit status, stdout, stderr).
pub fn admin_cli(data: &Path, args: &[&str]) -> (i32, String, String) {
    run(Command::new(boxd_bin())
        .args(["admin", "--data-dir"])
        .arg(data)
        .args(args))
}

/// A registration link for `key` that expired an hour ago (written to the log as the lobby
/// would have two hours ago); returns its code.
pub fn expired_link(node: &Node, key: &Path) -> String {
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let code = "e".repeat(32);
    write(
        node,
        json!({"type": "create_registration", "code": code,
               "fingerprint": fingerprint(key), "public_key": public.trim(),
               "at": now_ms() - 7_200_000, "expires_at": now_ms() - 3_600_000}),
    );
    code
}

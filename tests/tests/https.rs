//! The HTTPS front door of `boxd up`, driven with the real curl: TLS with the local CA, SNI
//! routing to a VM's web server (a local stand-in until workers run VMs), forwarded headers,
//! 100 MiB streamed both ways, each failure page, the HTTP redirect, and refusal of
//! connections to addresses that are not ours.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use boxd_tests::{
    Node, UP, eventually, fake_worker, now_ms, ready_field as field, running_vm, write,
    write_config,
};
use serde_json::json;
use uuid::Uuid;

const IP: &str = "127.0.39.1";
/// The VMs' web servers (their "private addresses").
const BACKEND: &str = "127.0.39.10";
const DEAD_BACKEND: &str = "127.0.39.11";
const HTTPS_PORT: u16 = 28443;
const HTTP_PORT: u16 = 28080;

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backend() -> Backend {
    backend_at(BACKEND)
}

/// The fixture web server on `ip`:8000.
fn backend_at(ip: &str) -> Backend {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/http_backend.py");
    Backend(boxd_tests::spawn_ready(
        Command::new("python3").args([script, ip, "8000"]),
    ))
}

/// curl with the local CA, `name.boxd.test` resolved to `ip`; returns (status, body).
fn curl(ca: &str, name: &str, ip: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            "--cacert",
            ca,
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("{name}:{HTTPS_PORT}:{ip}"))
        .args(extra)
        .arg(format!("https://{name}:{HTTPS_PORT}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

#[test]
fn curl_reaches_vms_through_the_https_front_door() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "https", &format!("{IP}:7000"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[https]\nlisten = \"{IP}:8443\"\nredirect_listen = \"{IP}:8080\""),
        &format!(
            "[https]\nlisten = \"0.0.0.0:{HTTPS_PORT}\"\nredirect_listen = \"0.0.0.0:{HTTP_PORT}\""
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.path().join("data"), &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    assert_eq!(field(&ready, "https"), format!("0.0.0.0:{HTTPS_PORT}"));
    let ca = field(&ready, "ca").to_owned();
    assert!(std::path::Path::new(&ca).exists(), "{ready}");
    let node_id = fake_worker(&node);

    let _web = backend();
    let owner = Uuid::new_v4();
    write(
        &node,
        json!({"type": "create_account", "id": owner, "name": "alice", "max_vms": null, "at": now_ms()}),
    );
    let mut vms = Vec::new();
    for name in ["myapp", "sleepy", "dead"] {
        let id = Uuid::new_v4();
        write(
            &node,
            json!({"type": "create_vm", "id": id, "owner": owner, "name": name, "http_port": 8000,
            "at": now_ms(), "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}}),
        );
        vms.push(id);
    }
    // The worker's part, by hand: each VM placed here reports its private address.
    eventually(Duration::from_secs(20), "placement", || {
        let all = node.admin().ok(&json!({"op": "vms"}));
        (all.as_array()
            .unwrap()
            .iter()
            .all(|v| !v["worker"].is_null()))
        .then_some(())
    });
    for (id, ip) in [(vms[0], BACKEND), (vms[1], BACKEND), (vms[2], DEAD_BACKEND)] {
        write(
            &node,
            json!({"type": "report_vm", "vm": id, "worker": node_id, "observed": "running",
            "private_ip": ip, "at": now_ms()}),
        );
    }
    write(
        &node,
        json!({"type": "set_vm_desired", "by": owner, "vm": vms[1], "desired": "stopped", "at": now_ms()}),
    );
    let pub_ip = "127.77.0.2";

    // HTTP/1.1 and HTTP/2 (ALPN h2) alike.
    for version in ["--http1.1", "--http2"] {
        let curl = |ca: &str, name: &str, ip: &str, path: &str, extra: &[&str]| {
            let mut e = vec![version];
            e.extend_from_slice(extra);
            curl(ca, name, ip, path, &e)
        };
        eprintln!("curl {version}");
        let used = Command::new("curl")
            .args([version, "-sS", "-o", "/dev/null", "-w", "%{http_version}"])
            .args(["--cacert", &ca, "--resolve"])
            .arg(format!("myapp.boxd.test:{HTTPS_PORT}:{pub_ip}"))
            .arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/"))
            .output()
            .unwrap();
        let want = if version == "--http2" { "2" } else { "1.1" };
        assert_eq!(String::from_utf8_lossy(&used.stdout), want, "negotiated");
        // A request reaches the VM with the forwarding headers.
        let (code, body) = curl(&ca, "myapp.boxd.test", pub_ip, "/hello?x=1", &[]);
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("GET /hello?x=1\n"), "{body}");
        for want in [
            "x-forwarded-proto: https",
            "x-forwarded-host: myapp.boxd.test",
            "forwarded: for=127.0.0.1;proto=https;host=\"myapp.boxd.test\"",
        ] {
            assert!(body.contains(want), "missing {want:?} in {body}");
        }
        assert!(
            !body.contains("\nconnection:"),
            "persistent by default: {body}"
        );
        assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{body}");
        // An empty body by `Content-Length: 0` ends the response (HTTP/2: END_STREAM at once).
        let empty = Command::new("curl")
            .args([
                version,
                "-sS",
                "-o",
                "-",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca,
            ])
            .arg("--resolve")
            .arg(format!("myapp.boxd.test:{HTTPS_PORT}:{pub_ip}"))
            .arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/big/0"))
            .output()
            .unwrap();
        assert!(empty.status.success(), "{empty:?}");
        assert_eq!(empty.stdout, b"200");
        // Names are case-insensitive; TLS 1.2 works as well as 1.3.
        let (code, _) = curl(
            &ca,
            "MyApp.Boxd.Test",
            pub_ip,
            "/",
            &["--tlsv1.2", "--tls-max", "1.2"],
        );
        assert_eq!(code, 200);

        // Keep-alive: two requests on one connection (curl counts new connections per transfer).
        let out = Command::new("curl")
            .args([
                version,
                "-sS",
                "--max-time",
                "30",
                "--cacert",
                &ca,
                "-w",
                "[%{num_connects}]\n",
            ])
            .arg("--resolve")
            .arg(format!("myapp.boxd.test:{HTTPS_PORT}:{pub_ip}"))
            .arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/one"))
            .arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/two"))
            .arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/close-after"))
            .arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/three"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let one = text.find("GET /one\n").expect("first answer");
        let two = text.find("GET /two\n").expect("second answer");
        assert!(one < two, "{text}");
        assert!(
            text[..two].contains("[1]") && text[two..].contains("[0]"),
            "reused: {text}"
        );
        // The VM connection is kept too: /one and /two arrive on one, as does /close-after,
        // after which the VM closes it; /three still gets through, on a fresh one.
        let ports: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("peer-port: "))
            .collect();
        assert_eq!(ports.len(), 4, "{text}");
        assert!(ports[0] == ports[1] && ports[1] == ports[2], "kept: {text}");
        assert_ne!(
            ports[2], ports[3],
            "a closed VM connection is not reused: {text}"
        );
        // Kept VM connections are shared by a shard's client connections: one request per
        // client connection, and each shard opens at most one VM connection for them all.
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut seen = std::collections::HashSet::new();
        for i in 0..shards + 3 {
            let (code, body) = curl(
                &ca,
                "myapp.boxd.test",
                pub_ip,
                &format!("/c{i}"),
                &[version],
            );
            assert_eq!(code, 200, "{body}");
            let port = body.lines().find_map(|l| l.strip_prefix("peer-port: "));
            seen.insert(port.expect("peer port").to_owned());
        }
        assert!(seen.len() <= shards, "{shards} shards, VM ports {seen:?}");
        // A client naming an IP address as SNI (wrk does, for an IP in its URL) is served by
        // Host and leaves no line in the log: a log written per connection is a cost (and a
        // disk) any client could run up.
        let before = std::fs::read_to_string(&node.log).unwrap_or_default().len();
        let mut sni = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-ign_eof",
                "-servername",
                pub_ip,
                "-connect",
            ])
            .arg(format!("{pub_ip}:{HTTPS_PORT}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        sni.stdin
            .take()
            .unwrap()
            .write_all(
                b"GET /ip-sni HTTP/1.1\r\nHost: myapp.boxd.test\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let sni = sni.wait_with_output().unwrap();
        let answer = String::from_utf8_lossy(&sni.stdout);
        assert!(answer.contains("GET /ip-sni"), "{sni:?}");
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        assert!(!log[before..].contains("SNI"), "logged: {}", &log[before..]);
        // HTTP/2 multiplexes: eight transfers at once on one connection.
        if version == "--http2" {
            let mut cmd = Command::new("curl");
            cmd.args([
                "--http2",
                "-sS",
                "-Z",
                "--parallel-max",
                "8",
                "--cacert",
                &ca,
            ])
            .args(["-w", "[%{num_connects}]\n", "--resolve"])
            .arg(format!("myapp.boxd.test:{HTTPS_PORT}:{pub_ip}"));
            for i in 0..8 {
                cmd.arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/p{i}"));
            }
            let text = String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned();
            for i in 0..8 {
                assert!(text.contains(&format!("GET /p{i}\n")), "{text}");
            }
            assert_eq!(text.matches("[1]").count(), 1, "one connection: {text}");
        }
        // A Host that names another VM than the connection's SNI is misdirected.
        let (code, _) = curl(
            &ca,
            "myapp.boxd.test",
            pub_ip,
            "/",
            &["-H", "Host: dead.boxd.test"],
        );
        assert_eq!(code, 421);

        // 100 MiB each way, streamed, checked by sha256.
        let big = 100 * 1024 * 1024;
        let file = dir.path().join("upload.bin");
        let data: Vec<u8> = (0..big).map(|i| (i % 253) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let sum = |bytes: &[u8]| {
            let out = Command::new("sha256sum")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write as _;
                    c.stdin.take().unwrap().write_all(bytes)?;
                    c.wait_with_output()
                })
                .unwrap();
            String::from_utf8(out.stdout).unwrap()[..64].to_owned()
        };
        let (code, body) = curl(
            &ca,
            "myapp.boxd.test",
            pub_ip,
            "/upload",
            &["--data-binary", &format!("@{}", file.display())],
        );
        assert_eq!(code, 200);
        assert_eq!(body, sum(&data), "upload arrived intact");
        // The same upload chunked (no length known in advance).
        let (code, body) = curl(
            &ca,
            "myapp.boxd.test",
            pub_ip,
            "/upload",
            &[
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &format!("@{}", file.display()),
            ],
        );
        assert_eq!(code, 200);
        assert_eq!(body, sum(&data), "chunked upload arrived intact");
        let out = Command::new("curl")
            .args([
                version,
                "-sS",
                "--max-time",
                "60",
                "--cacert",
                &ca,
                "--resolve",
            ])
            .arg(format!("myapp.boxd.test:{HTTPS_PORT}:{pub_ip}"))
            .arg(format!("https://myapp.boxd.test:{HTTPS_PORT}/big/{big}"))
            .output()
            .unwrap();
        assert_eq!(out.stdout.len(), big, "download length");
        let pattern: Vec<u8> = (0..251u8).cycle().take(big).collect();
        assert_eq!(sum(&out.stdout), sum(&pattern), "download arrived intact");

        // Failure pages.
        let (code, body) = curl(&ca, "nope.boxd.test", pub_ip, "/", &[]);
        assert_eq!(code, 404);
        assert!(
            body.contains("nope") && body.contains("boxd.test"),
            "{body}"
        );
        // The zone's own name is the cluster's page; a name outside the zone (its TLS name
        // mismatches, hence -k) is not served here: 421, not "no VM called example".
        for version in ["--http1.1", "--http2"] {
            let (code, body) = curl(&ca, "boxd.test", pub_ip, "/", &[version]);
            assert_eq!(code, 200, "{body}");
            assert!(body.contains("boxd.test new --name=myapp"), "{body}");
            let (code, body) = curl(&ca, "example.com", pub_ip, "/", &["-k", version]);
            assert_eq!(code, 421, "{body}");
            assert!(body.contains("example.com is not one of them"), "{body}");
        }
        let (code, body) = curl(&ca, "sleepy.boxd.test", pub_ip, "/", &[]);
        assert_eq!(code, 503);
        assert!(
            body.contains("sleepy is stopped") && body.contains("start sleepy"),
            "{body}"
        );
        let (code, body) = curl(&ca, "dead.boxd.test", pub_ip, "/", &[]);
        assert_eq!(code, 502);
        assert!(body.contains("port 8000"), "{body}");
        // Over the header limit: 400 naming it.
        let many: Vec<String> = (0..70).map(|i| format!("X-Filler-{i}: {i}")).collect();
        let mut args = Vec::new();
        for h in &many {
            args.extend(["-H", h.as_str()]);
        }
        let (code, body) = curl(&ca, "myapp.boxd.test", pub_ip, "/", &args);
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("more than 64 header fields"), "{body}");
    }

    // A WebSocket round trip through the proxy (Python's ssl client: curl here has no ws).
    let ws = format!(
        r#"
import base64, os, socket, ssl, sys
ctx = ssl.create_default_context(cafile="{ca}")
raw = socket.create_connection(("{pub_ip}", {HTTPS_PORT}), timeout=20)
s = ctx.wrap_socket(raw, server_hostname="myapp.boxd.test")
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: myapp.boxd.test\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: " + key + "\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
print(head.split(b"\r\n")[0].decode())
msg = b"hello over websocket"
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(msg)))
frame = s.recv(2)
print(s.recv(frame[1]).decode())
"#
    );
    let out = Command::new("python3").args(["-c", &ws]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "HTTP/1.1 101 Switching Protocols\necho: hello over websocket\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Plain HTTP redirects to HTTPS.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "--resolve",
        ])
        .arg(format!("myapp.boxd.test:{HTTP_PORT}:{pub_ip}"))
        .arg(format!("http://myapp.boxd.test:{HTTP_PORT}/a/b?c"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("301 https://myapp.boxd.test:{HTTPS_PORT}/a/b?c")
    );

    // A connection to an address that is neither the lobby nor a pool address is closed.
    let (code, _) = curl(&ca, "myapp.boxd.test", IP, "/", &[]);
    assert_eq!(code, 0, "served on a foreign address");
}

/// `boxd up` named `name` on `ip` with HTTPS on 0.0.0.0:`port` and the extra `[https]`
/// settings `https`; returns the node and its ready line.
fn https_node(
    dir: &std::path::Path,
    name: &str,
    ip: &str,
    port: u16,
    https: &str,
) -> (Node, String) {
    let cfg = write_config(dir, name, &format!("{ip}:7000"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[https]\nlisten = \"{ip}:8443\""),
        &format!("[https]\nlisten = \"0.0.0.0:{port}\"\n{https}"),
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.join("data"), &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    (node, ready)
}

/// A new account's running VM `myapp` whose web server is `web`:8000.
fn myapp_at(node: &Node, web: &str) {
    let owner = Uuid::new_v4();
    write(
        node,
        json!({"type": "create_account", "id": owner, "name": "op", "max_vms": null, "at": now_ms()}),
    );
    running_vm(node, &json!(owner), "myapp", 8000, web);
}

/// curl fetching `/big/<size>` from myapp on `port` at `rate`, its body on a pipe.
fn download(ca: &str, port: u16, size: usize, rate: &str, extra: &[&str]) -> Child {
    Command::new("curl")
        .args(["-sS", "--max-time", "60", "--limit-rate", rate, "-o", "-"])
        .args(["--cacert", ca])
        .args(extra)
        .arg("--resolve")
        .arg(format!("myapp.boxd.test:{port}:127.77.0.2"))
        .arg(format!("https://myapp.boxd.test:{port}/big/{size}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A CA and a `*.boxd.test` certificate it signed, made with the openssl CLI in `dir`.
/// Returns (CA certificate, leaf chain, leaf key).
fn openssl_ca(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let p = |f: &str| dir.join(format!("{name}-{f}")).display().to_string();
    let ext = p("ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:*.boxd.test,DNS:boxd.test\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let script = format!(
        "set -e
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {cakey} \
           -out {ca} -days 30 -subj '/CN=test CA {name}' \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=keyCertSign 2>/dev/null
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {key} \
           -out {csr} -subj '/CN=*.boxd.test' 2>/dev/null
         openssl x509 -req -in {csr} -CA {ca} -CAkey {cakey} -CAcreateserial -out {leaf} \
           -days 30 -extfile {ext} 2>/dev/null
         cat {leaf} {ca} > {chain}",
        cakey = p("ca.key"),
        ca = p("ca.crt"),
        key = p("leaf.key"),
        csr = p("leaf.csr"),
        leaf = p("leaf.crt"),
        chain = p("chain.crt"),
    );
    let st = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(st.success(), "openssl failed");
    (p("ca.crt"), p("chain.crt"), p("leaf.key"))
}

#[test]
fn an_operator_certificate_is_reloaded_without_dropping_connections() {
    const IP2: &str = "127.0.39.2";
    const WEB: &str = "127.0.39.12";
    const PORT: u16 = 28444;
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, chain_a, key_a) = openssl_ca(dir.path(), "a");
    let (ca_b, chain_b, key_b) = openssl_ca(dir.path(), "b");
    let (cert, key) = (dir.path().join("zone.crt"), dir.path().join("zone.key"));
    std::fs::copy(&chain_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let (node, ready) = https_node(
        dir.path(),
        "reload",
        IP2,
        PORT,
        &format!(
            "cert = \"{}\"\nkey = \"{}\"\nreload_secs = 1\nmax_connections_per_ip = 3",
            cert.display(),
            key.display()
        ),
    );
    assert!(
        !ready.contains(" ca="),
        "no local CA with an operator certificate: {ready}"
    );
    let _web = backend_at(WEB);
    myapp_at(&node, WEB);
    let get = |ca: &str, path: &str, extra: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "-o",
                "-",
                "-w",
                "%{http_code}",
                "--cacert",
                ca,
            ])
            .arg("--resolve")
            .arg(format!("myapp.boxd.test:{PORT}:127.77.0.2"))
            .args(extra)
            .arg(format!("https://myapp.boxd.test:{PORT}{path}"))
            .output()
            .unwrap()
    };
    let out = get(&ca_a, "/", &[]);
    assert!(out.stdout.ends_with(b"200"), "{out:?}");

    // A slow download on a connection made with certificate A, across the swap.
    let size = 6_000_000usize;
    let slow = download(&ca_a, PORT, size, "1M", &[]);
    std::thread::sleep(Duration::from_millis(500));
    for (from, to) in [(&key_b, &key), (&chain_b, &cert)] {
        let tmp = to.with_extension("new");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
    eventually(Duration::from_secs(15), "certificate B in service", || {
        get(&ca_b, "/", &[]).stdout.ends_with(b"200").then_some(())
    });
    let old = get(&ca_a, "/", &[]);
    assert!(
        !old.status.success(),
        "A's CA no longer verifies new connections"
    );
    let done = slow.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "the open download survived the reload"
    );
    assert_eq!(done.stdout.len(), size);
}

/// The header deadline (slowloris): a TLS client that sends half a request head, or an HTTP/2
/// client that never sends its preface, idles with no stream open, or trickles a header block
/// that never ends, is disconnected once `header_timeout_secs` pass (an idle HTTP/2 connection
/// after a GOAWAY), at a VM's name and at the gRPC API's — while an HTTP/2 download slower
/// than the deadline runs to its end.
#[test]
fn slow_and_idle_clients_are_cut_off_at_the_header_deadline() {
    const IP3: &str = "127.0.39.3";
    const WEB: &str = "127.0.39.13";
    const PORT: u16 = 28445;
    const DEADLINE_SECS: u64 = 2;
    let deadline = DEADLINE_SECS as f64;
    let dir = tempfile::tempdir().unwrap();
    let (node, ready) = https_node(
        dir.path(),
        "deadline",
        IP3,
        PORT,
        &format!("header_timeout_secs = {DEADLINE_SECS}"),
    );
    let ca = field(&ready, "ca").to_owned();
    let _web = backend_at(WEB);
    myapp_at(&node, WEB);

    // Started first, so it is still running while the slow clients are cut off.
    let size = 3_000_000usize;
    let download = download(
        &ca,
        PORT,
        size,
        "500K",
        &["--http2", "-w", "%{http_version}"],
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/slow_client.py");
    // The same against the gRPC API's host (served by hyper, not the proxy's HTTP/2).
    let cases = [
        ("h1-partial", "127.77.0.2", "myapp.boxd.test"),
        ("h2-silent", "127.77.0.2", "myapp.boxd.test"),
        ("h2-idle", "127.77.0.2", "myapp.boxd.test"),
        ("h2-trickle", "127.77.0.2", "myapp.boxd.test"),
        ("h2-silent", "127.77.0.1", "api.boxd.test"),
        ("h2-idle", "127.77.0.1", "api.boxd.test"),
        ("h2-trickle", "127.77.0.1", "api.boxd.test"),
    ];
    let clients: Vec<_> = cases
        .into_iter()
        .map(|(mode, ip, sni)| {
            let child = Command::new("python3")
                .args([script, ip, &PORT.to_string(), sni, &ca])
                .args([mode, "20"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            (format!("{mode} {sni}"), child)
        })
        .collect();
    for (case, child) in clients {
        let mode = case.split(' ').next().unwrap();
        let out = child.wait_with_output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words.first(), Some(&"closed"), "{case}: {line}");
        let secs: f64 = words[1].parse().unwrap();
        assert!(
            (deadline - 0.5..deadline + 3.0).contains(&secs),
            "{case}: closed after {secs} s, deadline {deadline} s"
        );
        if mode == "h2-idle" {
            // SETTINGS (4) first, and a GOAWAY (7) before the close.
            let frames: Vec<&str> = words[2].split(',').collect();
            assert_eq!(frames.first(), Some(&"4"), "{case}: {line}");
            assert!(frames.contains(&"7"), "{case}: no GOAWAY: {line}");
        }
    }

    let done = download.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    assert_eq!(done.stdout.len(), size + 1, "the whole body, then `2`");
    assert!(done.stdout.ends_with(b"2"), "HTTP/2 was used");
}

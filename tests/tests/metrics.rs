//! Prometheus metrics (issue 29): `[metrics] listen` serves the OpenMetrics exposition, which
//! Debian's `promtool check metrics` accepts; a real Prometheus (Debian's `prometheus`) started
//! here scrapes it, and a PromQL query through its HTTP API sees the Raft commit index rise as
//! writes are made. `/healthz` and `/readyz` answer, anything else is a 404.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use boxd_test_support::Proc;
use boxd_tests::{Node, UP, eventually, now_ms, write, write_config};
use serde_json::{Value, json};

const METRICS: &str = "127.0.48.1:9464";
const PROMETHEUS: &str = "127.0.48.2:9090";

/// `curl URL`: (status, body).
fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.trim_end().to_owned())
}

/// The value of a PromQL query's first sample, once Prometheus has one.
fn query(q: &str) -> Option<f64> {
    let (status, body) = get(&format!("http://{PROMETHEUS}/api/v1/query?query={q}"));
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_every_metric_and_sees_commits_rise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write_config(
        d,
        "m",
        "127.0.48.1:7000",
        &format!("\n[metrics]\nlisten = \"{METRICS}\"\n"),
    );
    let node = Node::start(&UP, &d.join("data"), &cfg);
    node.wait_ready(Duration::from_secs(30));

    // The exposition: what promtool accepts, with the metrics operators need.
    let (status, body) = get(&format!("http://{METRICS}/metrics"));
    assert_eq!(status, 200, "{body}");
    for name in [
        "boxd_raft_term ",
        "boxd_raft_commit_index ",
        "boxd_raft_applied_index ",
        "boxd_raft_apply_lag 0",
        "boxd_raft_commit_latency_seconds_bucket{le=",
        "boxd_node_up{id=\"1\",name=\"m\"} 1",
        "boxd_vms{state=\"running\"} 0",
        "boxd_dns_answers_total{rcode=\"NOERROR\"}",
        "boxd_https_responses_total{class=\"2xx\"}",
        "boxd_ssh_auth_failures_total ",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (ops/test installs prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{body}\n").as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The front doors' counters move: a name that does not exist is counted as NXDOMAIN.
    let (status, out, err) = boxd_test_support::run(Command::new("dig").args([
        "-p",
        "5353",
        "@127.0.48.1",
        "+tries=1",
        "+time=5",
        "nope.boxd.test",
    ]));
    assert!(status == 0 && out.contains("NXDOMAIN"), "{out}{err}");
    let (_, body) = get(&format!("http://{METRICS}/metrics"));
    assert!(
        body.contains("boxd_dns_answers_total{rcode=\"NXDOMAIN\"} 1"),
        "{body}"
    );

    // Prometheus asks for OpenMetrics, and gets it.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
        ])
        .arg(format!("http://{METRICS}/metrics"))
        .output()
        .unwrap();
    let om = String::from_utf8_lossy(&out.stdout);
    assert!(
        om.ends_with("# EOF\n") && om.contains("# TYPE boxd_dns_answers counter"),
        "{om}"
    );
    assert_eq!(
        get(&format!("http://{METRICS}/healthz")),
        (200, "ok".into())
    );
    assert_eq!(
        get(&format!("http://{METRICS}/readyz")),
        (200, "ready".into())
    );
    assert_eq!(get(&format!("http://{METRICS}/secret")).0, 404);

    // A real Prometheus scrapes it every second.
    std::fs::write(
        d.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: boxd\n    \
             static_configs:\n      - targets: [\"{METRICS}\"]\n"
        ),
    )
    .unwrap();
    let _prometheus = Proc(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                d.join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("prometheus (ops/test installs it)"),
    );
    let before = eventually(Duration::from_secs(60), "Prometheus has a sample", || {
        query("boxd_raft_commit_index")
    });
    assert_eq!(query("boxd_node_up"), Some(1.0));
    for i in 0..20 {
        write(
            &node,
            json!({"type": "create_account", "id": uuid::Uuid::new_v4().to_string(),
                   "name": format!("acct{i}"), "max_vms": 1, "at": now_ms()}),
        );
    }
    let after = eventually(Duration::from_secs(30), "the commit index rises", || {
        query("boxd_raft_commit_index").filter(|v| *v >= before + 20.0)
    });
    assert!(after >= before + 20.0, "{before} -> {after}");
    // The commit latency histogram is usable in PromQL.
    let rate = eventually(Duration::from_secs(30), "a commit rate", || {
        query("rate(boxd_raft_commit_latency_seconds_count%5B1m%5D)").filter(|r| *r > 0.0)
    });
    assert!(rate > 0.0);
}

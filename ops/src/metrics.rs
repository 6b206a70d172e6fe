//! Prometheus metrics and health endpoints (`[metrics] listen`, off by default): plain HTTP on
//! the operator's address, for a Prometheus server on the operators' network.
//!
//! - `/metrics`: the OpenMetrics text exposition (prometheus-client) for scrapers that ask for
//!   it (Prometheus does), the classic text format otherwise (curl, `promtool check metrics`);
//!   built at each scrape
//!   from this node's replica: Raft (term, leader, last log / commit / applied index, apply
//!   lag, snapshot index, members, commit latency histogram), node liveness (up and heartbeat
//!   age per node, judged with `[node] missed_heartbeats`), and VMs by state.
//! - `/healthz`: 200 while the process serves.
//! - `/readyz`: 200 once a leader is known and this replica is within [`READY_LAG`] entries of
//!   the commit index it knows; else 503 saying which.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use boxd_controlplane::Replica;
use boxd_controlplane::counters;
use boxd_controlplane::model::Observed;
use boxd_operations::Operations;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Most entries a replica may be behind the commit index and still be ready.
pub const READY_LAG: u64 = 1000;

/// What the scrapes read.
pub struct Sources {
    /// The replica.
    pub replica: Arc<Replica>,
    /// The operations (liveness of workers).
    pub ops: Arc<Operations>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    id: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// Binds `[metrics] listen` (before the replica opens, so a taken port fails fast).
pub fn bind(listen: &str) -> Result<Option<std::net::TcpListener>, String> {
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("metrics.listen {listen}: {e}"))?;
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on metrics.listen {addr}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(Some(l))
}

/// Serves until `stop`.
pub async fn serve(
    listener: std::net::TcpListener,
    sources: Arc<Sources>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let sources = Arc::clone(&sources);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let sources = Arc::clone(&sources);
                async move { Ok::<_, Infallible>(answer(&sources, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

/// Whether the scraper asks for OpenMetrics (Prometheus does); others (curl, promtool) get
/// the classic text format.
fn wants_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// The classic text format (0.0.4) of an OpenMetrics exposition: a counter family is named
/// with its `_total` suffix, as its samples are, and there is no `# EOF`. (Gauges and
/// histograms read the same in both.)
pub fn classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{p}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer<B>(s: &Sources, req: &Request<B>) -> Response<Full<Bytes>> {
    let plain = "text/plain; charset=utf-8";
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, plain, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => match exposition(s).await {
            Ok(body) if wants_openmetrics(req) => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Ok(body) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                classic(&body),
            ),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, plain, format!("{e}\n")),
        },
        "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
        "/readyz" => {
            let st = s.replica.status();
            match (st.leader, st.replica_lag) {
                (None, _) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    "not ready: no leader known\n".into(),
                ),
                (Some(_), lag) if lag > READY_LAG => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    format!("not ready: {lag} entries behind the commit index\n"),
                ),
                _ => text(StatusCode::OK, plain, "ready\n".into()),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "no such page: /metrics, /healthz and /readyz are here\n".into(),
        ),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabels {
    rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: String,
}

fn counter(reg: &mut Registry, name: &str, help: &str, c: &std::sync::atomic::AtomicU64) {
    let k = Counter::<u64>::default();
    k.inc_by(counters::get(c));
    reg.register(name, help, k);
}

/// What the DNS, HTTPS and SSH shards counted in this process (zero on nodes without them).
fn front_doors(reg: &mut Registry) {
    let c = &counters::COUNTERS;
    let rcodes = Family::<RcodeLabels, Counter>::default();
    for (i, n) in c.dns_answers.iter().enumerate() {
        let name = match i {
            0 => "NOERROR".to_owned(),
            1 => "FORMERR".to_owned(),
            2 => "SERVFAIL".to_owned(),
            3 => "NXDOMAIN".to_owned(),
            4 => "NOTIMP".to_owned(),
            5 => "REFUSED".to_owned(),
            _ => i.to_string(),
        };
        let v = counters::get(n);
        if v > 0 || i <= 5 {
            rcodes.get_or_create(&RcodeLabels { rcode: name }).inc_by(v);
        }
    }
    reg.register("dns_answers", "DNS answers sent, by RCODE", rcodes);
    counter(
        reg,
        "dns_dropped",
        "DNS queries dropped unanswered (malformed, or rate-limited)",
        &c.dns_dropped,
    );
    let classes = Family::<ClassLabels, Counter>::default();
    for (i, n) in c.https_responses.iter().enumerate() {
        let class = if i == 0 {
            "other".to_owned()
        } else {
            format!("{i}xx")
        };
        classes
            .get_or_create(&ClassLabels { class })
            .inc_by(counters::get(n));
    }
    reg.register(
        "https_responses",
        "HTTPS responses to clients, by status class (the VMs' and boxd's own pages)",
        classes,
    );
    counter(
        reg,
        "https_handshake_errors",
        "TLS handshakes that failed or timed out",
        &c.https_handshake_errors,
    );
    counter(
        reg,
        "https_connections",
        "HTTPS client connections accepted",
        &c.https_connections,
    );
    let open = counters::get(&c.https_connections).saturating_sub(counters::get(&c.https_closed));
    gauge(
        reg,
        "https_open_connections",
        "HTTPS client connections open",
        open,
    );
    counter(
        reg,
        "ssh_connections",
        "SSH connections accepted",
        &c.ssh_connections,
    );
    let open = counters::get(&c.ssh_connections).saturating_sub(counters::get(&c.ssh_closed));
    gauge(reg, "ssh_open_connections", "SSH connections open", open);
    counter(
        reg,
        "ssh_auth_failures",
        "SSH public keys refused",
        &c.ssh_auth_failures,
    );
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    reg.register(name, help, g);
}

/// The exposition, read now.
async fn exposition(s: &Sources) -> Result<String, String> {
    let mut reg = Registry::with_prefix("boxd");
    let st = s.replica.status();
    let info = Family::<VersionLabels, Gauge>::default();
    info.get_or_create(&VersionLabels {
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .set(1);
    reg.register("build_info", "This boxd's version", info);
    gauge(&mut reg, "raft_term", "Current Raft term", st.term);
    gauge(
        &mut reg,
        "raft_leader_id",
        "Id of the leader this node knows (0: none)",
        st.leader.unwrap_or(0),
    );
    gauge(
        &mut reg,
        "raft_is_leader",
        "1 on the leader",
        u64::from(st.state == "leader"),
    );
    gauge(
        &mut reg,
        "raft_last_log_index",
        "Last log index here",
        st.last_log_index,
    );
    gauge(
        &mut reg,
        "raft_commit_index",
        "Commit index this node knows",
        st.commit_index,
    );
    gauge(
        &mut reg,
        "raft_applied_index",
        "Log index applied to this replica",
        st.applied_index,
    );
    gauge(
        &mut reg,
        "raft_apply_lag",
        "Committed entries this replica has yet to apply",
        st.replica_lag,
    );
    gauge(
        &mut reg,
        "raft_snapshot_index",
        "Log index of the latest snapshot",
        st.snapshot_index.unwrap_or(0),
    );
    gauge(
        &mut reg,
        "raft_voters",
        "Voting members",
        st.voters.len() as u64,
    );
    gauge(
        &mut reg,
        "raft_learners",
        "Non-voting members",
        st.learners.len() as u64,
    );
    reg.register(
        "raft_commit_latency_seconds",
        "Time from proposing a batch of commands to its commit and apply (on the leader)",
        s.replica.commit_latency().clone(),
    );

    let nodes = s
        .replica
        .reader()
        .nodes()
        .await
        .map_err(|e| e.to_string())?;
    let now = s.replica.now();
    let liveness = u64::try_from(s.ops.settings().liveness.as_millis()).unwrap_or(u64::MAX);
    let up = Family::<NodeLabels, Gauge>::default();
    let age = Family::<NodeLabels, Gauge>::default();
    for n in &nodes {
        let l = NodeLabels {
            id: n.id.to_string(),
            name: n.name.clone(),
        };
        let silent = now.saturating_sub(n.last_heartbeat);
        up.get_or_create(&l).set(i64::from(silent <= liveness));
        age.get_or_create(&l)
            .set(i64::try_from(silent / 1000).unwrap_or(i64::MAX));
    }
    reg.register(
        "node_up",
        "1 when the node's last heartbeat is within the liveness bound",
        up,
    );
    reg.register(
        "node_heartbeat_age_seconds",
        "Seconds since the node's last heartbeat",
        age,
    );

    let mut vms = s.replica.reader().vms().await.map_err(|e| e.to_string())?;
    let silent = s.ops.silent_workers().await.map_err(|e| e.to_string())?;
    boxd_operations::mark_unknown(&mut vms, &silent);
    let states = Family::<StateLabels, Gauge>::default();
    for o in [
        Observed::Pending,
        Observed::Placed,
        Observed::Starting,
        Observed::Booting,
        Observed::Running,
        Observed::Stopped,
        Observed::Failed,
        Observed::Unknown,
    ] {
        let n = vms.iter().filter(|v| v.observed == o).count();
        states
            .get_or_create(&StateLabels {
                state: o.as_str().into(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    reg.register("vms", "VMs by state (unknown: on a silent worker)", states);
    front_doors(&mut reg);

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_samples() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1\"} 2\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 2\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}

//! Command line: argument parsing, exit codes (0 ok, 1 failure, 2 bad usage or config) and the
//! human output of `boxd admin`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use boxd_controlplane::membership::Member;
use boxd_controlplane::model::{Role, Vm};
use clap::{Parser, Subcommand};

use crate::admin::{self, Request};
use crate::config::{Config, DEFAULT_TOML, default_data_dir};
use crate::node::{self, NodeError, Start};
use crate::status::NodeStatus;

/// boxd: a cloud whose interface is SSH. One binary for every role.
#[derive(Parser, Debug)]
#[command(name = "boxd", version, propagate_version = true)]
struct Cli {
    /// Data directory [default: /var/lib/boxd as root, else $XDG_DATA_HOME/boxd]
    #[arg(long, global = true, env = "BOXD_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Config file (TOML); without one the embedded defaults apply (`boxd config default`)
    #[arg(long, global = true, env = "BOXD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a single node with every role and embedded defaults, in the foreground
    Up {
        /// Roles to run, comma-separated [default: every role]
        #[arg(long, value_delimiter = ',')]
        role: Vec<Role>,
    },
    /// Found a new cluster with this node as its first control node, in the foreground
    Init,
    /// Join an existing cluster through any of its members, in the foreground
    Join {
        /// Raft/gRPC address of any member (IP:PORT)
        addr: String,
        /// Join token from `boxd admin join-token` (or printed by `boxd init`)
        #[arg(long)]
        token: String,
        /// Roles for this node, comma-separated [default: node.roles from the config]
        #[arg(long, value_delimiter = ',')]
        role: Vec<Role>,
    },
    /// Resume a node whose data directory already holds its identity
    Run,
    /// Ask the running node over its admin socket
    Admin {
        /// Print the raw JSON reply
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: AdminCmd,
    },
    /// Configuration helpers
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Run one VM in this process (started by the worker; see vmm/worker/DESIGN.md)
    Vmm {
        /// VM config (JSON)
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Where to serve the VM's API (HTTP/1.1 over a Unix socket)
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// Do not install the seccomp filter (for debugging the VMM only)
        #[arg(long)]
        no_seccomp: bool,
    },
    /// Run one sandbox-runtime VM in this process (started by the worker; see vmm/worker/DESIGN.md)
    Sandbox {
        /// Sandbox spec (JSON)
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Where to serve the VM's API (HTTP/1.1 over a Unix socket)
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
    },
    /// Build and list VM images (root filesystem trees in <data-dir>/images)
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
    /// Print what virtualization this host offers VMs: hardware, emulated or none
    Host {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Build an image: `minimal` (busybox and the guest agent, seconds) or `debian`
    /// (debootstrap, the agent and its units; minutes, needs root)
    Build {
        /// Recipe name
        name: String,
        /// Debian mirror (`debian` only)
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        /// Debian suite (`debian` only)
        #[arg(long, default_value = "bookworm")]
        suite: String,
    },
    /// List the built images
    Ls {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCmd {
    /// Node, Raft and replication status
    Status,
    /// Cluster members with their roles and replication lag
    Members,
    /// VMs in the local replica
    Vms,
    /// The public key guest agents must authorise (the proxy's key towards VMs)
    AgentKey,
    /// Keys waiting behind registration links; `approve CODE` links one
    Registrations {
        #[command(subcommand)]
        command: Option<RegistrationsCmd>,
    },
    /// The keys that sign API tokens: `rotate` adds a new one
    TokenKeys {
        #[command(subcommand)]
        command: TokenKeysCmd,
    },
    /// Create a token that lets a node join with the given roles
    JoinToken {
        /// Roles the joining node may take, comma-separated
        #[arg(long, value_delimiter = ',', required = true)]
        role: Vec<Role>,
        /// Validity, e.g. 30m, 24h, 7d
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum TokenKeysCmd {
    /// Sign new tokens with a new key; tokens signed with the old ones work until they expire
    Rotate,
}

#[derive(Subcommand, Debug)]
enum RegistrationsCmd {
    /// Link the key waiting behind CODE to a new account (or to an existing one)
    Approve {
        /// The code from the registration link
        code: String,
        /// Name of the new account (default: user-<first 8 characters of CODE>)
        #[arg(long, conflicts_with = "to_account")]
        name: Option<String>,
        /// Join this existing account instead (its name or id)
        #[arg(long)]
        to_account: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the full default configuration with comments
    Default,
    /// Validate the file given with --config
    Check,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    boxd_operations::parse_duration(s)
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("boxd: {msg}");
    ExitCode::from(code)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BOXD_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn,hyper=warn")
    });
    // Colours for a terminal only: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Restores the default SIGPIPE action so that `boxd admin ... | head` ends quietly like other
/// Unix tools instead of failing on a closed stdout. Not used for node commands: a server must
/// see EPIPE on its sockets, not die.
fn default_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_DFL has no memory-safety preconditions; it is
    // done before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Cmd::Admin { .. } | Cmd::Config { .. } | Cmd::Host { .. } | Cmd::Image { .. }
    ) {
        default_sigpipe();
    }
    match cli.command {
        Cmd::Config {
            command: ConfigCmd::Default,
        } => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Cmd::Config {
            command: ConfigCmd::Check,
        } => match Config::load(cli.config.as_deref()) {
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(e) => fail(2, e),
        },
        Cmd::Vmm {
            config,
            api_sock,
            no_seccomp,
        } => {
            init_logging();
            ExitCode::from(boxd_vmm::process::run(&boxd_vmm::process::Options {
                config: &config,
                api_sock: &api_sock,
                seccomp: !no_seccomp,
            }))
        }
        Cmd::Sandbox { config, api_sock } => {
            init_logging();
            ExitCode::from(boxd_worker::sandbox::run(&boxd_worker::sandbox::Options {
                config: &config,
                api_sock: &api_sock,
            }))
        }
        Cmd::Host { json } => {
            let r = boxd_vmm::host::detect();
            if json {
                println!("{}", serde_json::json!(r));
            } else {
                println!("virtualization: {} ({})", r.virtualization, r.reason);
            }
            ExitCode::SUCCESS
        }
        Cmd::Image { command } => {
            let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
            image_command(&data_dir, command)
        }
        Cmd::Admin { json, command } => {
            let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
            let cfg = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            admin_command(&cfg.admin_socket(&data_dir), json, command)
        }
        cmd => {
            let mut cfg = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            let start = match cmd {
                Cmd::Up { role } => {
                    cfg.node.roles = if role.is_empty() {
                        Role::ALL.to_vec()
                    } else {
                        let mut roles = role;
                        roles.sort();
                        roles.dedup();
                        roles
                    };
                    Start::Up
                }
                Cmd::Init => Start::Init,
                Cmd::Join { addr, token, role } => {
                    if !role.is_empty() {
                        let mut roles = role;
                        roles.sort();
                        roles.dedup();
                        cfg.node.roles = roles;
                    }
                    Start::Join { seed: addr, token }
                }
                Cmd::Run => Start::Run,
                Cmd::Admin { .. }
                | Cmd::Config { .. }
                | Cmd::Vmm { .. }
                | Cmd::Sandbox { .. }
                | Cmd::Host { .. }
                | Cmd::Image { .. } => {
                    unreachable!("handled above")
                }
            };
            let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
            init_logging();
            run_node(start, cfg, data_dir)
        }
    }
}

fn run_node(start: Start, cfg: Config, data_dir: PathBuf) -> ExitCode {
    // One thread: task hand-offs on the write path stay on it instead of waking a parked
    // worker on another core each time (controlplane/DESIGN.md). Blocking work is elsewhere.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("boxd-control")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(node::run(start, cfg, data_dir, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(NodeError::Usage(m)) => fail(2, m),
        Err(NodeError::Failed(m)) => fail(1, m),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn image_command(data_dir: &Path, command: ImageCmd) -> ExitCode {
    use boxd_worker::image;
    match command {
        ImageCmd::Build {
            name,
            mirror,
            suite,
        } => {
            let here = std::env::current_exe().unwrap_or_default();
            let src = image::MinimalSources {
                busybox: PathBuf::from("/bin/busybox"),
                agent: here.with_file_name("boxd-agent"),
            };
            let start = std::time::Instant::now();
            let debian = image::DebianSource { mirror, suite };
            let r = image::build_from(data_dir, &name, &src, &debian, &mut |step| {
                eprintln!("{name}: {step}");
            });
            match r {
                Ok(info) => {
                    println!(
                        "built image {} ({} files, {:.1} MiB) in {:.1} s: {}",
                        info.name,
                        info.files,
                        info.bytes as f64 / (1 << 20) as f64,
                        start.elapsed().as_secs_f64(),
                        image::images_dir(data_dir).join(&info.name).display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e @ image::ImageError::UnknownRecipe(_)) => fail(2, e),
                Err(e) => fail(1, e),
            }
        }
        ImageCmd::Ls { json } => match image::list(data_dir) {
            Ok(list) if json => {
                println!("{}", serde_json::json!(list));
                ExitCode::SUCCESS
            }
            Ok(list) => {
                if list.is_empty() {
                    println!("no images yet: build one with `boxd image build minimal`");
                }
                for i in list {
                    println!(
                        "{:12} {:>6} files {:>8.1} MiB",
                        i.name,
                        i.files,
                        i.bytes as f64 / (1 << 20) as f64
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, e),
        },
    }
}

fn admin_command(socket: &Path, json: bool, command: AdminCmd) -> ExitCode {
    let req = match &command {
        AdminCmd::Status => Request::Status {},
        AdminCmd::Members => Request::Members {},
        AdminCmd::Vms => Request::Vms {},
        AdminCmd::AgentKey => Request::AgentKey {},
        AdminCmd::Registrations { command: None } => Request::Registrations {},
        AdminCmd::Registrations {
            command:
                Some(RegistrationsCmd::Approve {
                    code,
                    name,
                    to_account,
                }),
        } => Request::Approve {
            code: code.clone(),
            name: name.clone(),
            to_account: to_account.clone(),
        },
        AdminCmd::TokenKeys {
            command: TokenKeysCmd::Rotate,
        } => Request::RotateTokenKey {},
        AdminCmd::JoinToken { role, ttl } => Request::JoinToken {
            roles: role.clone(),
            ttl_secs: ttl.as_secs(),
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let reply = match rt.block_on(admin::call(socket, &req)) {
        Ok(r) => r,
        Err(e) => return fail(1, e),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        );
        return if reply.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let Some(result) = reply.result.filter(|_| reply.ok) else {
        return fail(1, reply.error.unwrap_or_else(|| "request failed".into()));
    };
    let printed = match command {
        AdminCmd::Status => serde_json::from_value(result).map(|s| print_status(&s)),
        AdminCmd::Members => serde_json::from_value(result).map(|m: Vec<Member>| print_members(&m)),
        AdminCmd::Vms => serde_json::from_value(result).map(|v: Vec<Vm>| print_vms(&v)),
        AdminCmd::AgentKey => {
            println!("{}", result["public_key"].as_str().unwrap_or_default());
            Ok(())
        }
        AdminCmd::Registrations { command: None } => {
            serde_json::from_value(result).map(|r: Vec<serde_json::Value>| print_registrations(&r))
        }
        AdminCmd::Registrations { command: Some(_) } => {
            let fp = result["fingerprint"].as_str().unwrap_or_default();
            let account = result["account"].as_str().unwrap_or_default();
            let new = if result["new_account"].as_bool() == Some(true) {
                "a new account"
            } else {
                "the account"
            };
            println!("linked {fp} to {new} {account}");
            Ok(())
        }
        AdminCmd::TokenKeys { .. } => {
            let kid = result["kid"].as_str().unwrap_or_default();
            println!("new tokens are signed with key {kid}");
            Ok(())
        }
        AdminCmd::JoinToken { role, .. } => {
            let token = result["token"].as_str().unwrap_or_default();
            let seed = result["seed"].as_str().unwrap_or_default();
            let roles: Vec<&str> = role.iter().map(|r| r.as_str()).collect();
            println!("{token}");
            eprintln!(
                "join with: boxd join {seed} --token {token} --role {}",
                roles.join(",")
            );
            Ok(())
        }
    };
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, format!("unexpected reply from boxd: {e}")),
    }
}

fn print_registrations(list: &[serde_json::Value]) {
    if list.is_empty() {
        println!("no keys are waiting for approval");
        return;
    }
    for r in list {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        println!("{}  {}  {}", s("code"), s("key_type"), s("fingerprint"));
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn ids(v: &[u64]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }
}

fn print_status(s: &NodeStatus) {
    let r = &s.replica;
    let serving: Vec<&str> = s.serving.iter().map(|r| r.as_str()).collect();
    println!(
        "node {} ({}) in cluster {}, zone {}",
        s.node_id,
        s.name,
        s.cluster_id,
        s.zone.as_deref().unwrap_or("-")
    );
    println!(
        "  roles:     {} (serving: {})",
        boxd_controlplane::model::roles_to_string(&s.roles),
        serving.join(",")
    );
    println!(
        "  raft:      {}, term {}, leader {} ({})",
        r.state,
        r.term,
        opt(r.leader),
        r.leader_addr.as_deref().unwrap_or("-")
    );
    println!(
        "  log:       last {}, commit {}, applied {}, replica lag {}",
        r.last_log_index, r.commit_index, r.applied_index, r.replica_lag
    );
    println!(
        "  snapshots: at {}, purged up to {}, built {}, installed {}",
        opt(r.snapshot_index),
        opt(r.purged_index),
        r.snapshots_built,
        r.snapshots_installed
    );
    println!(
        "  members:   voters {}; learners {}",
        ids(&r.voters),
        ids(&r.learners)
    );
    println!("  vms:       {}", s.vms);
    if let Some(w) = &s.worker {
        println!(
            "  worker:    runtime {} ({}); bridge {} {}; outbound NAT {}; {} VMs running",
            w.runtime,
            w.reason,
            w.bridge,
            w.subnet,
            w.nat.as_deref().unwrap_or("set up with the first VM"),
            w.running
        );
        let d = &w.disk;
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        println!(
            "  disk:      VMs' sizes {} GiB of {} GiB ({} GiB with {} % overcommit; disks are thin); \
             written {:.1} GiB, free {:.1} GiB{}",
            d.allocated_gib,
            d.offered_gib(),
            d.disk_gib,
            d.overcommit_percent,
            gib(d.written_bytes),
            gib(d.free_bytes),
            if d.nearly_full() {
                " — nearly full: VMs may fail to write; free space, or lower worker.disk_overcommit_percent"
            } else {
                ""
            }
        );
    }
    println!("  data:      {}", s.data_dir.display());
}

fn print_members(members: &[Member]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    println!(
        "{:<4} {:<16} {:<26} {:<22} {:<10} {:<11} {:>6}  HEARTBEAT",
        "ID", "NAME", "ROLES", "RAFT", "MEMBER", "STATE", "LAG"
    );
    for m in members {
        let hb = if m.last_heartbeat == 0 {
            "-".into()
        } else {
            format!("{}s ago", now.saturating_sub(m.last_heartbeat) / 1000)
        };
        println!(
            "{:<4} {:<16} {:<26} {:<22} {:<10} {:<11} {:>6}  {hb}",
            m.id,
            m.name,
            boxd_controlplane::model::roles_to_string(&m.roles),
            m.raft_addr,
            m.membership,
            m.state,
            opt(m.lag)
        );
    }
}

fn print_vms(vms: &[Vm]) {
    print!("{}", vms_table(vms));
}

/// The VMs as aligned columns. Every cell is a `String` first: the model's `Display` impls
/// write their text whole and ignore a width (they once left the columns ragged).
fn vms_table(vms: &[Vm]) -> String {
    let rows: Vec<[String; 6]> = vms
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.public_ip.to_string(),
                v.desired.to_string(),
                v.observed.to_string(),
                opt(v.worker),
                v.owner.to_string(),
            ]
        })
        .collect();
    let head = [
        "NAME",
        "PUBLIC IP",
        "DESIRED",
        "OBSERVED",
        "WORKER",
        "OWNER",
    ]
    .map(String::from);
    let mut widths = head.clone().map(|h| h.len());
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(&rows) {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_columns_line_up() {
        use boxd_controlplane::model::{AccountId, Desired, Observed, VmId, VmSpec};
        let vm = |name: &str, observed| Vm {
            id: VmId::random(),
            name: name.into(),
            owner: AccountId::random(),
            spec: VmSpec::default(),
            desired: Desired::Running,
            observed,
            reason: None,
            worker: Some(1),
            private_ip: None,
            public_ip: "127.77.0.2".parse().expect("ip"),
            http_port: 80,
            created_at: 0,
            updated_at: 0,
            agent_key: None,
        };
        let table = vms_table(&[
            vm("a", Observed::Pending),
            vm("a-much-longer-name", Observed::Running),
        ]);
        // Where each column starts: after two spaces (names have none).
        let starts: Vec<Vec<usize>> = table
            .lines()
            .map(|l| {
                let b = l.as_bytes();
                (2..b.len())
                    .filter(|&i| b[i] != b' ' && b[i - 1] == b' ' && b[i - 2] == b' ')
                    .collect()
            })
            .collect();
        assert_eq!(starts[0].len(), 5, "{table}");
        assert!(starts.iter().all(|s| *s == starts[0]), "{table}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "h", "5y", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}

//! The lobby: the SSH front end of the operations (boxd-operations). It runs a parsed
//! [`LobbyCommand`] for an authenticated account (parse → call → print): one operation per
//! command, its answer rendered for humans or as JSON, its error as one `boxd: …` line and an
//! exit status. It owns no I/O of its own; the SSH session decides where the bytes go.

use std::fmt::Write as _;
use std::sync::Arc;

use boxd_model::model::ApiToken;
use boxd_model::model::Vm;
use boxd_operations::{Approver, ErrorKind, OpError, Operations, PendingKey};
use serde_json::json;

pub use boxd_operations::{Caller, Progress};

use super::command::{HELP, LobbyCommand, NewArgs, Power};

/// What a command printed and its exit status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Standard output.
    pub stdout: String,
    /// Standard error (one line with the reason on failure).
    pub stderr: String,
    /// Exit status.
    pub code: u32,
}

impl Reply {
    fn out(stdout: String) -> Self {
        Self {
            stdout,
            ..Self::default()
        }
    }

    /// A failure with a one-line reason.
    pub fn fail(code: u32, reason: impl std::fmt::Display) -> Self {
        Self {
            stderr: format!("boxd: {reason}\n"),
            code,
            ..Self::default()
        }
    }
}

/// Exit status for a command line that does not parse, or a value that is not valid.
pub const EXIT_USAGE: u32 = 2;
/// Exit status for everything else that fails.
pub const EXIT_FAILED: u32 = 1;

impl From<OpError> for Reply {
    fn from(e: OpError) -> Self {
        let code = match e.kind {
            ErrorKind::Invalid => EXIT_USAGE,
            _ => EXIT_FAILED,
        };
        Reply::fail(code, e)
    }
}

/// Runs lobby commands.
pub struct Lobby {
    ops: Arc<Operations>,
}

impl Lobby {
    /// A lobby over `ops`.
    pub fn new(ops: Arc<Operations>) -> Self {
        Self { ops }
    }

    /// The operations.
    pub fn ops(&self) -> &Arc<Operations> {
        &self.ops
    }

    /// Runs `cmd` for `caller`; `stdin` is what the client sent before EOF (for `keys add`).
    pub async fn run(
        &self,
        caller: &Caller,
        cmd: LobbyCommand,
        stdin: &[u8],
        progress: &Progress,
    ) -> Reply {
        let ops = &self.ops;
        let r: Result<Reply, OpError> = match cmd {
            LobbyCommand::New(NewArgs { vm, json }) => ops
                .create(caller, vm, progress)
                .await
                .map(|vm| self.ready(&vm, json)),
            LobbyCommand::Ls { json } => ops.list(caller).await.map(|vms| self.ls(&vms, json)),
            LobbyCommand::Show { name, json } => ops.show(caller, &name).await.map(|s| {
                if json {
                    self.json_line(&s.vm)
                } else {
                    self.show(&s)
                }
            }),
            LobbyCommand::Rm { name } => ops.delete(caller, &name).await.map(|later| match later {
                None => Reply::out(format!("deleted {name}\n")),
                Some(why) => Reply::out(format!("deleted {name}; {why}\n")),
            }),
            LobbyCommand::Power { action, name } => match action {
                Power::Stop => ops.stop(caller, &name).await.map(|()| {
                    Reply::out(format!(
                        "stopping {name}; `start {name}` brings it back with its disk\n"
                    ))
                }),
                Power::Start => ops
                    .start(caller, &name, progress)
                    .await
                    .map(|vm| self.ready(&vm, false)),
                Power::Restart => ops
                    .restart(caller, &name, progress)
                    .await
                    .map(|vm| self.ready(&vm, false)),
            },
            LobbyCommand::Keys { json } => ops.keys(caller).await.map(|k| keys(caller, &k, json)),
            LobbyCommand::KeysAdd => ops
                .add_key(caller, stdin)
                .await
                .map(|fp| Reply::out(format!("added {fp}\n"))),
            LobbyCommand::KeysRm { fingerprint } => ops
                .remove_key(caller, &fingerprint)
                .await
                .map(|()| Reply::out(format!("removed {fingerprint}\n"))),
            LobbyCommand::Whoami { json } => ops.whoami(caller).await.map(|w| whoami(&w, json)),
            LobbyCommand::TokenCreate { token, json } => ops
                .create_token(caller, token)
                .await
                .map(|t| issued(&t, &ops.zone(), json)),
            LobbyCommand::TokenLs { json } => ops.tokens(caller).await.map(|t| tokens(&t, json)),
            LobbyCommand::TokenRm { id } => ops
                .revoke_token(caller, &id)
                .await
                .map(|()| Reply::out(format!("revoked {id}\n"))),
            LobbyCommand::Registrations { json } => {
                let by = Approver::Account(caller);
                ops.pending_keys(by)
                    .await
                    .map(|k| self.pending_keys(&k, json))
            }
            LobbyCommand::Approve { code, to } => ops
                .approve(Approver::Account(caller), &code, to)
                .await
                .map(|a| Reply::out(approved(&a, &ops.zone_ssh()))),
            LobbyCommand::SshConfig => ops.list(caller).await.map(|vms| {
                Reply::out(super::listing::ssh_config(
                    &ops.zone(),
                    ops.lobby_address(),
                    ops.settings().ssh_port,
                    &vms,
                ))
            }),
            LobbyCommand::Events { name } => ops
                .events(caller, &name)
                .await
                .map(|ev| Reply::out(super::listing::events(&ev, None))),
            LobbyCommand::Help => Ok(Reply::out(HELP.to_owned())),
            LobbyCommand::Exit => Ok(Reply::default()),
        };
        r.unwrap_or_else(Reply::from)
    }

    fn pending_keys(&self, keys: &[PendingKey], json: bool) -> Reply {
        if !json {
            return Reply::out(super::listing::pending_keys(keys, &self.ops.zone_ssh()));
        }
        let all: Vec<_> = keys
            .iter()
            .map(|k| {
                let mut v = json!(k);
                v["link"] = self.ops.apex_url(&format!("register/{}", k.code)).into();
                v
            })
            .collect();
        Reply::out(format!("{}\n", serde_json::Value::Array(all)))
    }

    fn vm_json(&self, v: &Vm) -> serde_json::Value {
        json!({
            "id": v.id.to_string(),
            "name": v.name,
            "state": v.observed.as_str(),
            "reason": v.reason,
            "desired": v.desired.as_str(),
            "address": v.public_ip.to_string(),
            "vcpus": v.spec.vcpus,
            "memory_mib": v.spec.memory_mib,
            "disk_gib": v.spec.disk_gib,
            "image": v.spec.image,
            "ssh": self.ops.ssh_command(&v.name),
            "https": self.ops.https_url(&v.name),
            "created_at": v.created_at,
        })
    }

    fn json_line(&self, v: &Vm) -> Reply {
        Reply::out(format!("{}\n", self.vm_json(v)))
    }

    /// A VM that is reachable: its name, address, ssh command and URL.
    fn ready(&self, vm: &Vm, json: bool) -> Reply {
        if json {
            return self.json_line(vm);
        }
        let mut s = format!(
            "{}\n  address  {}\n  ssh      {}\n",
            vm.name,
            vm.public_ip,
            self.ops.ssh_command(&vm.name)
        );
        if let Some(u) = self.ops.https_url(&vm.name) {
            let _ = writeln!(s, "  https    {u}");
        }
        Reply::out(s)
    }

    fn ls(&self, vms: &[Vm], json: bool) -> Reply {
        if json {
            let all: Vec<_> = vms.iter().map(|v| self.vm_json(v)).collect();
            return Reply::out(format!("{}\n", serde_json::Value::Array(all)));
        }
        if vms.is_empty() {
            return Reply::out("no VMs yet: create one with `new --name=NAME`\n".into());
        }
        let w = vms.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
        let mut s = format!(
            "{:w$}  {:8}  {:15}  {:>4}  {:>7}  {:>5}  IMAGE\n",
            "NAME", "STATE", "ADDRESS", "CPUS", "MEMORY", "DISK"
        );
        for v in vms {
            let _ = writeln!(
                s,
                "{:w$}  {:8}  {:15}  {:>4}  {:>6}M  {:>4}G  {}",
                v.name,
                v.observed.as_str(),
                v.public_ip.to_string(),
                v.spec.vcpus,
                v.spec.memory_mib,
                v.spec.disk_gib,
                v.spec.image
            );
        }
        Reply::out(s)
    }

    fn show(&self, shown: &boxd_operations::Shown) -> Reply {
        let v = &shown.vm;
        let mut s = format!(
            "name     {}\nstate    {} (wanted: {})\n",
            v.name, v.observed, v.desired
        );
        if let Some(why) = &shown.why {
            let _ = writeln!(s, "why      {why}");
        }
        let _ = writeln!(
            s,
            "address  {}\nssh      {}",
            v.public_ip,
            self.ops.ssh_command(&v.name)
        );
        let events = super::listing::events(&shown.recent, None);
        for (i, line) in events.lines().enumerate() {
            let label = if i == 0 { "events" } else { "" };
            let _ = writeln!(s, "{label:<8} {line}");
        }
        if let Some(u) = self.ops.https_url(&v.name) {
            let _ = writeln!(s, "https    {u}");
        }
        let _ = writeln!(
            s,
            "size     {} vCPU, {} MiB memory, {} GiB disk\nimage    {}",
            v.spec.vcpus, v.spec.memory_mib, v.spec.disk_gib, v.spec.image
        );
        Reply::out(s)
    }
}

/// A new token: the JWT alone on stdout (for `$(ssh … token create)`), what it allows on
/// stderr; or all of it as JSON.
fn issued(t: &boxd_operations::Issued, zone: &str, json: bool) -> Reply {
    if json {
        let mut v = token_json(&t.info);
        v["token"] = t.token.clone().into();
        return Reply::out(format!("{v}\n"));
    }
    let mut r = Reply::out(format!("{}\n", t.token));
    r.stderr = format!(
        "token {} for {}, {}, until {}: send it as `authorization: Bearer …` to api.{zone}\n",
        t.info.id,
        scope_text(&t.info),
        if t.info.read_only {
            "read-only"
        } else {
            "read-write"
        },
        super::listing::date(t.info.expires_at)
    );
    r
}

fn scope_text(t: &ApiToken) -> String {
    if t.vms.is_empty() {
        "every VM".into()
    } else {
        format!("VMs {}", t.vms.join(","))
    }
}

fn token_json(t: &ApiToken) -> serde_json::Value {
    json!({
        "id": t.id.to_string(),
        "label": t.name,
        "vms": t.vms,
        "read_only": t.read_only,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
    })
}

fn tokens(all: &[ApiToken], json: bool) -> Reply {
    if json {
        let v: Vec<_> = all.iter().map(token_json).collect();
        return Reply::out(format!("{}\n", serde_json::Value::Array(v)));
    }
    let mut s = String::new();
    for t in all {
        let _ = writeln!(
            s,
            "{}  {}  {}  until {}  {}",
            t.id,
            scope_text(t),
            if t.read_only { "ro" } else { "rw" },
            super::listing::date(t.expires_at),
            t.name
        );
    }
    Reply::out(s)
}

/// What an approval did, and what its key's owner does next.
pub fn approved(a: &boxd_operations::Approved, lobby: &str) -> String {
    let which = if a.new_account {
        "a new account"
    } else {
        "the account"
    };
    format!(
        "linked {} to {which} {}: its owner reconnects with `{lobby}`\n",
        a.fingerprint, a.account
    )
}

fn keys(caller: &Caller, keys: &[boxd_model::model::SshKey], json: bool) -> Reply {
    if json {
        let all: Vec<_> = keys
            .iter()
            .map(|k| {
                json!({
                    "fingerprint": k.fingerprint.as_str(),
                    "public_key": k.public_key,
                    "added_at": k.added_at,
                    "current": Some(&k.fingerprint) == caller.fingerprint(),
                })
            })
            .collect();
        return Reply::out(format!("{}\n", serde_json::Value::Array(all)));
    }
    let mut s = String::new();
    for k in keys {
        let mut parts = k.public_key.split_whitespace();
        let kind = parts.next().unwrap_or("?");
        let comment: Vec<&str> = parts.skip(1).collect();
        let mark = if Some(&k.fingerprint) == caller.fingerprint() {
            "  (this key)"
        } else {
            ""
        };
        let _ = writeln!(s, "{}  {kind}  {}{mark}", k.fingerprint, comment.join(" "));
    }
    Reply::out(s)
}

fn whoami(w: &boxd_operations::Whoami, json: bool) -> Reply {
    if json {
        return Reply::out(format!(
            "{}\n",
            json!({
                "account": w.account,
                "id": w.id.to_string(),
                "key": w.key.as_ref().map(|k| k.as_str()),
                "vms": w.vms,
                "max_vms": w.max_vms,
                "owner": w.owner,
            })
        ));
    }
    let owner = if w.owner {
        "owner    yes (approves registrations)\n"
    } else {
        ""
    };
    Reply::out(format!(
        "account  {}\nid       {}\nkey      {}\nvms      {} of {}\n{owner}",
        w.account,
        w.id,
        w.key.as_ref().map_or("-", |k| k.as_str()),
        w.vms,
        w.max_vms
    ))
}

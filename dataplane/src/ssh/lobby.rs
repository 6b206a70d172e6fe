//! The lobby: runs a parsed [`LobbyCommand`] for an authenticated account against the
//! [`Backend`] and the View, and renders the answer for humans or as JSON. It owns no I/O of
//! its own beyond those two; the SSH session decides where the bytes go.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use boxd_model::command::{ApplyError, Command, Outcome};
use boxd_model::model::{AccountId, Desired, Fingerprint, Observed, Vm, VmId, VmSpec};
use boxd_model::view::ViewHandle;
use serde_json::json;
use tokio::sync::mpsc;

use super::backend::{Backend, BackendError};
use super::command::{HELP, LobbyCommand, NewArgs, Power};

/// Addresses and limits the lobby prints or obeys.
#[derive(Clone, Debug)]
pub struct LobbySettings {
    /// Port users reach SSH on (printed in `ssh -p`).
    pub ssh_port: u16,
    /// Port users reach HTTPS on; `None` when no proxy serves HTTPS.
    pub https_port: Option<u16>,
    /// How long `new`, `start` and `restart` wait for the VM to become reachable.
    pub ready_timeout: Duration,
}

impl Default for LobbySettings {
    fn default() -> Self {
        Self {
            ssh_port: 2222,
            https_port: Some(8443),
            ready_timeout: Duration::from_secs(120),
        }
    }
}

/// Who runs the command.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Account.
    pub account: AccountId,
    /// The key they authenticated with.
    pub fingerprint: Fingerprint,
}

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

/// Exit status for a command line that does not parse.
pub const EXIT_USAGE: u32 = 2;
/// Exit status for everything else that fails.
pub const EXIT_FAILED: u32 = 1;

impl From<BackendError> for Reply {
    fn from(e: BackendError) -> Self {
        Reply::fail(EXIT_FAILED, e)
    }
}

/// Progress lines for stderr while a command waits.
#[derive(Clone, Debug, Default)]
pub struct Progress(Option<mpsc::UnboundedSender<String>>);

impl Progress {
    /// Progress that goes to `tx`.
    pub fn to(tx: mpsc::UnboundedSender<String>) -> Self {
        Self(Some(tx))
    }

    fn line(&self, s: String) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(s);
        }
    }
}

/// Runs lobby commands.
pub struct Lobby<B> {
    backend: Arc<B>,
    view: Arc<ViewHandle>,
    settings: LobbySettings,
}

impl<B: Backend> Lobby<B> {
    /// A lobby over `backend` and `view`.
    pub fn new(backend: Arc<B>, view: Arc<ViewHandle>, settings: LobbySettings) -> Self {
        Self {
            backend,
            view,
            settings,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The View.
    pub fn view(&self) -> &Arc<ViewHandle> {
        &self.view
    }

    /// Runs `cmd` for `caller`; `stdin` is what the client sent before EOF (for `keys add`).
    pub async fn run(
        &self,
        caller: &Caller,
        cmd: LobbyCommand,
        stdin: &[u8],
        progress: &Progress,
    ) -> Reply {
        let r = match cmd {
            LobbyCommand::New(a) => self.new_vm(caller, a, progress).await,
            LobbyCommand::Ls { json } => self.ls(caller, json).await,
            LobbyCommand::Show { name, json } => self.show(caller, &name, json).await,
            LobbyCommand::Rm { name } => self.rm(caller, &name).await,
            LobbyCommand::Power { action, name } => {
                self.power(caller, action, &name, progress).await
            }
            LobbyCommand::Keys { json } => self.keys(caller, json).await,
            LobbyCommand::KeysAdd => self.keys_add(caller, stdin).await,
            LobbyCommand::KeysRm { fingerprint } => self.keys_rm(caller, &fingerprint).await,
            LobbyCommand::Whoami { json } => self.whoami(caller, json).await,
            LobbyCommand::SshConfig => self.ssh_config(caller).await,
            LobbyCommand::Events { name } => self.events(caller, &name, None).await,
            LobbyCommand::Help => Ok(Reply::out(HELP.to_owned())),
            LobbyCommand::Exit => Ok(Reply::default()),
        };
        r.unwrap_or_else(|e| e)
    }

    /// A VM's events (the last `last` of them, or all), one per line with its UTC time.
    async fn events(
        &self,
        caller: &Caller,
        name: &str,
        last: Option<usize>,
    ) -> Result<Reply, Reply> {
        let v = self.find(caller, name).await?;
        let events = self.backend.events_of(v.id).await?;
        Ok(Reply::out(super::listing::events(&events, last)))
    }

    /// An OpenSSH config block for the caller's VMs (see `listing::ssh_config`).
    async fn ssh_config(&self, caller: &Caller) -> Result<Reply, Reply> {
        let vms = self.backend.vms_of(caller.account).await?;
        let lobby = self.view.current().lobby_addresses().next();
        Ok(Reply::out(super::listing::ssh_config(
            &self.zone(),
            lobby,
            self.settings.ssh_port,
            &vms,
        )))
    }

    /// The zone, for messages.
    pub fn zone(&self) -> String {
        self.view.current().zone().unwrap_or("boxd.test").to_owned()
    }

    fn ssh_line(&self, name: &str) -> String {
        let zone = self.zone();
        match self.settings.ssh_port {
            22 => format!("ssh {name}.{zone}"),
            p => format!("ssh -p {p} {name}.{zone}"),
        }
    }

    /// `https://<zone>[:port]/<path>` (the port when it is not 443), e.g. a registration link.
    pub fn apex_url(&self, path: &str) -> String {
        let zone = self.zone();
        match self.settings.https_port {
            None | Some(443) => format!("https://{zone}/{path}"),
            Some(p) => format!("https://{zone}:{p}/{path}"),
        }
    }

    fn url(&self, name: &str) -> Option<String> {
        let zone = self.zone();
        self.settings.https_port.map(|p| match p {
            443 => format!("https://{name}.{zone}/"),
            p => format!("https://{name}.{zone}:{p}/"),
        })
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
            "ssh": self.ssh_line(&v.name),
            "https": self.url(&v.name),
            "created_at": v.created_at,
        })
    }

    /// What a pending VM waits for (see `capacity::waiting`).
    async fn waiting_for(&self, caller: &Caller, name: &str) -> String {
        let (workers, vm) = (self.backend.workers().await, self.find(caller, name).await);
        match (workers, vm) {
            (Ok(ws), Ok(vm)) => super::capacity::waiting(&ws, &vm.spec),
            _ => "waiting for a worker with room".to_owned(),
        }
    }

    /// `: <reason>` when the worker gave one for the VM's state, else nothing.
    async fn reason_of(&self, caller: &Caller, name: &str) -> String {
        self.find(caller, name)
            .await
            .ok()
            .and_then(|v| v.reason)
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    }

    async fn find(&self, caller: &Caller, name: &str) -> Result<Vm, Reply> {
        let vms = self.backend.vms_of(caller.account).await?;
        vms.into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Reply::fail(EXIT_FAILED, format!("no VM named {name}: see `ls`")))
    }

    async fn new_vm(
        &self,
        caller: &Caller,
        a: NewArgs,
        progress: &Progress,
    ) -> Result<Reply, Reply> {
        let d = VmSpec::default();
        let spec = VmSpec {
            vcpus: a.cpus.unwrap_or(d.vcpus),
            memory_mib: a.memory_mib.unwrap_or(d.memory_mib),
            disk_gib: a.disk_gib.unwrap_or(d.disk_gib),
            image: a.image.unwrap_or(d.image),
        };
        spec.validate().map_err(|e| Reply::fail(EXIT_USAGE, e))?;
        let name = a.name.unwrap_or_else(generated_name);
        if let Some(p) = boxd_model::model::vm_name_problem(&name) {
            return Err(Reply::fail(
                EXIT_USAGE,
                format!("the name {name:?} is not valid: {p}"),
            ));
        }
        let workers = self.backend.workers().await?;
        if let Some(why) = super::capacity::never_fits(&workers, &spec) {
            return Err(Reply::fail(EXIT_FAILED, why));
        }
        progress.line(format!(
            "creating {name}: {} vCPU, {} MiB memory, {} GiB disk, image {}",
            spec.vcpus, spec.memory_mib, spec.disk_gib, spec.image
        ));
        let id = VmId::random();
        let out = self
            .backend
            .write(Command::CreateVm {
                id,
                owner: caller.account,
                name: name.clone(),
                spec,
                http_port: 80,
                at: self.backend.now(),
            })
            .await?;
        if let Outcome::VmCreated { public_ip, .. } = out {
            progress.line(format!("{name} has address {public_ip}"));
        }
        let vm = self.wait_running(caller, id, &name, progress).await?;
        Ok(self.ready_reply(&vm, a.json))
    }

    fn ready_reply(&self, vm: &Vm, json: bool) -> Reply {
        if json {
            return Reply::out(format!("{}\n", self.vm_json(vm)));
        }
        let mut s = format!(
            "{}\n  address  {}\n  ssh      {}\n",
            vm.name,
            vm.public_ip,
            self.ssh_line(&vm.name)
        );
        if let Some(u) = self.url(&vm.name) {
            let _ = writeln!(s, "  https    {u}");
        }
        Reply::out(s)
    }

    /// Waits until the VM is running and wired (a private address), reporting each state.
    async fn wait_running(
        &self,
        caller: &Caller,
        id: VmId,
        name: &str,
        progress: &Progress,
    ) -> Result<Vm, Reply> {
        let mut changes = self.view.subscribe();
        let deadline = tokio::time::Instant::now() + self.settings.ready_timeout;
        let mut last: Option<Observed> = None;
        let mut said: Option<String> = None;
        loop {
            let state = self
                .view
                .current()
                .vm(id)
                .map(|r| (r.observed, r.private_ip, r.worker, r.reason.clone()));
            let Some((observed, private_ip, worker, reason)) = state else {
                return Err(Reply::fail(
                    EXIT_FAILED,
                    format!("{name} was deleted while starting"),
                ));
            };
            if last != Some(observed) {
                last = Some(observed);
                match (observed, worker) {
                    (Observed::Placed, Some(w)) => {
                        progress.line(format!("{name} is placed on node {w}"))
                    }
                    (Observed::Starting, _) => progress.line(format!("{name} is starting")),
                    (Observed::Pending, _) => {
                        let why = self.waiting_for(caller, name).await;
                        progress.line(format!("{name} is {why}"));
                    }
                    _ => {}
                }
            }
            // What the worker says while it starts the VM (fetching its image, say).
            if observed == Observed::Starting && reason.is_some() && reason != said {
                if let Some(r) = &reason {
                    progress.line(format!("{name}: {r}"));
                }
                said = reason;
            }
            match observed {
                Observed::Running if private_ip.is_some() => {
                    return self.find(caller, name).await;
                }
                Observed::Failed => {
                    let why = self.reason_of(caller, name).await;
                    return Err(Reply::fail(
                        EXIT_FAILED,
                        format!(
                            "{name} failed to start{why}; see `show {name}` and the worker's log"
                        ),
                    ));
                }
                Observed::Booting => {
                    let why = self.reason_of(caller, name).await;
                    return Err(Reply::fail(
                        EXIT_FAILED,
                        format!(
                            "{name} is booting but cannot finish on its worker{why}. It keeps its name and address; `rm {name}` removes it"
                        ),
                    ));
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Reply::fail(EXIT_FAILED, "the node is shutting down")),
                Err(_) => {
                    return Err(Reply::fail(
                        EXIT_FAILED,
                        format!(
                            "{name} is not running after {} s (state: {observed}); it keeps starting in the background: see `show {name}`",
                            self.settings.ready_timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }

    async fn ls(&self, caller: &Caller, json: bool) -> Result<Reply, Reply> {
        let mut vms = self.backend.vms_of(caller.account).await?;
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        if json {
            let all: Vec<_> = vms.iter().map(|v| self.vm_json(v)).collect();
            return Ok(Reply::out(format!("{}\n", serde_json::Value::Array(all))));
        }
        if vms.is_empty() {
            return Ok(Reply::out(
                "no VMs yet: create one with `new --name=NAME`\n".into(),
            ));
        }
        let w = vms.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
        let mut s = format!(
            "{:w$}  {:8}  {:15}  {:>4}  {:>7}  {:>5}  IMAGE\n",
            "NAME", "STATE", "ADDRESS", "CPUS", "MEMORY", "DISK"
        );
        for v in &vms {
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
        Ok(Reply::out(s))
    }

    async fn show(&self, caller: &Caller, name: &str, json: bool) -> Result<Reply, Reply> {
        let v = self.find(caller, name).await?;
        if json {
            return Ok(Reply::out(format!("{}\n", self.vm_json(&v))));
        }
        let mut s = format!(
            "name     {}\nstate    {} (wanted: {})\n",
            v.name, v.observed, v.desired
        );
        if let Some(r) = &v.reason {
            let _ = writeln!(s, "why      {r}");
        } else if v.observed == Observed::Pending {
            let why = self.waiting_for(caller, name).await;
            let _ = writeln!(s, "why      {why}");
        }
        let _ = writeln!(
            s,
            "address  {}\nssh      {}",
            v.public_ip,
            self.ssh_line(&v.name)
        );
        if let Ok(events) = self.events(caller, name, Some(3)).await
            && !events.stdout.is_empty()
        {
            for (i, line) in events.stdout.lines().enumerate() {
                let label = if i == 0 { "events" } else { "" };
                let _ = writeln!(s, "{label:<8} {line}");
            }
        }
        if let Some(u) = self.url(&v.name) {
            let _ = writeln!(s, "https    {u}");
        }
        let _ = writeln!(
            s,
            "size     {} vCPU, {} MiB memory, {} GiB disk\nimage    {}",
            v.spec.vcpus, v.spec.memory_mib, v.spec.disk_gib, v.spec.image
        );
        Ok(Reply::out(s))
    }

    async fn rm(&self, caller: &Caller, name: &str) -> Result<Reply, Reply> {
        let v = self.find(caller, name).await?;
        self.backend
            .write(Command::DeleteVm {
                by: caller.account,
                vm: v.id,
                at: self.backend.now(),
            })
            .await?;
        Ok(Reply::out(format!("deleted {name}\n")))
    }

    async fn set_desired(&self, caller: &Caller, v: &Vm, desired: Desired) -> Result<(), Reply> {
        self.backend
            .write(Command::SetVmDesired {
                by: caller.account,
                vm: v.id,
                desired,
                at: self.backend.now(),
            })
            .await?;
        Ok(())
    }

    async fn power(
        &self,
        caller: &Caller,
        action: Power,
        name: &str,
        progress: &Progress,
    ) -> Result<Reply, Reply> {
        let v = self.find(caller, name).await?;
        match action {
            Power::Stop => {
                self.set_desired(caller, &v, Desired::Stopped).await?;
                Ok(Reply::out(format!(
                    "stopping {name}; `start {name}` brings it back with its disk\n"
                )))
            }
            Power::Start => {
                self.set_desired(caller, &v, Desired::Running).await?;
                let vm = self.wait_running(caller, v.id, name, progress).await?;
                Ok(self.ready_reply(&vm, false))
            }
            Power::Restart => {
                self.set_desired(caller, &v, Desired::Stopped).await?;
                progress.line(format!("stopping {name}"));
                self.wait_stopped(v.id, name).await?;
                self.set_desired(caller, &v, Desired::Running).await?;
                let vm = self.wait_running(caller, v.id, name, progress).await?;
                Ok(self.ready_reply(&vm, false))
            }
        }
    }

    async fn wait_stopped(&self, id: VmId, name: &str) -> Result<(), Reply> {
        let mut changes = self.view.subscribe();
        let deadline = tokio::time::Instant::now() + self.settings.ready_timeout;
        loop {
            match self.view.current().vm(id).map(|r| r.observed) {
                None => return Err(Reply::fail(EXIT_FAILED, format!("{name} was deleted"))),
                Some(Observed::Running | Observed::Starting) => {}
                Some(_) => return Ok(()),
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(Reply::fail(
                        EXIT_FAILED,
                        format!("{name} did not stop in time; try `start {name}` later"),
                    ));
                }
            }
        }
    }

    async fn keys(&self, caller: &Caller, json: bool) -> Result<Reply, Reply> {
        let keys = self.backend.keys_of(caller.account).await?;
        if json {
            let all: Vec<_> = keys
                .iter()
                .map(|k| {
                    json!({
                        "fingerprint": k.fingerprint.as_str(),
                        "public_key": k.public_key,
                        "added_at": k.added_at,
                        "current": k.fingerprint == caller.fingerprint,
                    })
                })
                .collect();
            return Ok(Reply::out(format!("{}\n", serde_json::Value::Array(all))));
        }
        let mut s = String::new();
        for k in &keys {
            let mut parts = k.public_key.split_whitespace();
            let kind = parts.next().unwrap_or("?");
            let comment: Vec<&str> = parts.skip(1).collect();
            let mark = if k.fingerprint == caller.fingerprint {
                "  (this key)"
            } else {
                ""
            };
            let _ = writeln!(s, "{}  {kind}  {}{mark}", k.fingerprint, comment.join(" "));
        }
        Ok(Reply::out(s))
    }

    async fn keys_add(&self, caller: &Caller, stdin: &[u8]) -> Result<Reply, Reply> {
        let text = std::str::from_utf8(stdin).map_err(|_| {
            Reply::fail(EXIT_USAGE, "the key on stdin is not text: pipe a public key, e.g. `ssh boxd.test keys add < ~/.ssh/id_ed25519.pub`")
        })?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| Reply::fail(EXIT_USAGE, "no key on stdin: pipe a public key, e.g. `ssh boxd.test keys add < ~/.ssh/id_ed25519.pub`"))?;
        let (fingerprint, public_key) =
            parse_public_key(line).map_err(|e| Reply::fail(EXIT_USAGE, e))?;
        self.backend
            .write(Command::AddSshKey {
                account: caller.account,
                fingerprint: fingerprint.clone(),
                public_key,
                at: self.backend.now(),
            })
            .await?;
        Ok(Reply::out(format!("added {fingerprint}\n")))
    }

    async fn keys_rm(&self, caller: &Caller, fp: &str) -> Result<Reply, Reply> {
        let fingerprint: Fingerprint = fp.parse().map_err(|_| {
            Reply::fail(
                EXIT_USAGE,
                format!("{fp} is not a key fingerprint: copy one from `keys`"),
            )
        })?;
        self.backend
            .write(Command::RemoveSshKey {
                account: caller.account,
                fingerprint,
            })
            .await
            .map_err(|e| match e {
                BackendError::Rejected(
                    ApplyError::NotYours { .. } | ApplyError::NotFound { .. },
                ) => Reply::fail(
                    EXIT_FAILED,
                    format!("no key {fp} on this account: see `keys`"),
                ),
                e => e.into(),
            })?;
        Ok(Reply::out(format!("removed {fp}\n")))
    }

    async fn whoami(&self, caller: &Caller, json: bool) -> Result<Reply, Reply> {
        let (name, quota) = self
            .backend
            .account_name(caller.account)
            .await?
            .ok_or_else(|| Reply::fail(EXIT_FAILED, "your account no longer exists"))?;
        let vms = self.backend.vms_of(caller.account).await?.len();
        if json {
            return Ok(Reply::out(format!(
                "{}\n",
                json!({
                    "account": name,
                    "id": caller.account.to_string(),
                    "key": caller.fingerprint.as_str(),
                    "vms": vms,
                    "max_vms": quota,
                })
            )));
        }
        Ok(Reply::out(format!(
            "account  {name}\nid       {}\nkey      {}\nvms      {vms} of {quota}\n",
            caller.account, caller.fingerprint
        )))
    }
}

/// Parses one `authorized_keys`-style line; returns its fingerprint and its normalised form.
pub fn parse_public_key(line: &str) -> Result<(Fingerprint, String), String> {
    let key = russh::keys::PublicKey::from_openssh(line).map_err(|e| {
        format!("not an OpenSSH public key ({e}): expected a line like `ssh-ed25519 AAAA… me@host`")
    })?;
    let blob = key
        .to_bytes()
        .map_err(|e| format!("cannot encode the key: {e}"))?;
    let text = key
        .to_openssh()
        .map_err(|e| format!("cannot encode the key: {e}"))?;
    Ok((Fingerprint::of_key_blob(&blob), text))
}

/// A name for a VM created without one: `vm-` and six random hex digits.
fn generated_name() -> String {
    format!("vm-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn public_keys_parse_and_fingerprint_like_ssh_keygen() {
        // `ssh-keygen -lf` on this key prints this fingerprint.
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";
        let (fp, text) = parse_public_key(line).unwrap();
        assert!(text.starts_with(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
        ));
        assert!(fp.as_str().starts_with("SHA256:"));
        assert!(
            parse_public_key("ssh-ed25519 notbase64")
                .unwrap_err()
                .contains("OpenSSH public key")
        );
        assert!(parse_public_key("").is_err());
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..100 {
            let n = generated_name();
            assert_eq!(boxd_model::model::vm_name_problem(&n), None, "{n}");
        }
    }
}

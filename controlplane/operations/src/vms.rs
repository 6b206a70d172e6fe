//! The VM operations: create, list, find, show, events, delete, start, stop and restart, and
//! the waits that make `create`, `start` and `restart` return only once the VM is reachable.

use boxd_model::command::{Command, Outcome};
use boxd_model::model::{Desired, Millis, Observed, Vm, VmId, VmSpec, vm_name_problem};

use crate::{Caller, ErrorKind, OpError, Operations, Progress};

/// What `create` asks for; `None` means the cluster default (a generated name for the name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewVm {
    /// DNS label; generated when absent.
    pub name: Option<String>,
    /// Image name.
    pub image: Option<String>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Disk in GiB.
    pub disk_gib: Option<u64>,
}

/// One VM with what `show` says about it.
#[derive(Clone, Debug)]
pub struct Shown {
    /// The VM.
    pub vm: Vm,
    /// Why it is in its state: the worker's reason, or what a pending VM waits for.
    pub why: Option<String>,
    /// Its last few events, oldest first.
    pub recent: Vec<(Millis, String)>,
}

/// Events `show` includes.
const RECENT_EVENTS: usize = 3;

impl Operations {
    /// Creates a VM for `caller` and waits until it is running and wired, reporting each
    /// state on `progress`.
    pub async fn create(
        &self,
        caller: &Caller,
        req: NewVm,
        progress: &Progress,
    ) -> Result<Vm, OpError> {
        caller.may_write(None)?;
        let d = VmSpec::default();
        let spec = VmSpec {
            vcpus: req.cpus.unwrap_or(d.vcpus),
            memory_mib: req.memory_mib.unwrap_or(d.memory_mib),
            disk_gib: req.disk_gib.unwrap_or(d.disk_gib),
            image: req.image.unwrap_or(d.image),
        };
        spec.validate().map_err(OpError::invalid)?;
        let name = req.name.unwrap_or_else(generated_name);
        if let Some(p) = vm_name_problem(&name) {
            return Err(OpError::invalid(format!(
                "the name {name:?} is not valid: {p}"
            )));
        }
        let workers = self.backend.workers().await?;
        if let Some(why) = crate::capacity::never_fits(&workers, &spec) {
            return Err(OpError::new(ErrorKind::Exhausted, why));
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
        self.wait_running(caller, id, &name, progress).await
    }

    /// The caller's VMs, by name.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<Vm>, OpError> {
        let mut vms = self.backend.vms_of(caller.account).await?;
        let scope = caller.scope();
        vms.retain(|v| scope.covers(&v.name));
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        if vms.iter().any(|v| v.worker.is_some()) {
            crate::liveness::mark_unknown(&mut vms, &self.silent_workers().await?);
        }
        Ok(vms)
    }

    /// The caller's VM called `name`.
    pub async fn find(&self, caller: &Caller, name: &str) -> Result<Vm, OpError> {
        caller.may_read(name)?;
        let vms = self.backend.vms_of(caller.account).await?;
        vms.into_iter().find(|v| v.name == name).ok_or_else(|| {
            OpError::new(ErrorKind::NotFound, format!("no VM named {name}: see `ls`"))
        })
    }

    /// The caller's VM called `name`, why it is in its state and its last events.
    pub async fn show(&self, caller: &Caller, name: &str) -> Result<Shown, OpError> {
        let mut vm = self.find(caller, name).await?;
        if vm.worker.is_some() {
            let silent = self.silent_workers().await?;
            crate::liveness::mark_unknown(std::slice::from_mut(&mut vm), &silent);
        }
        let why = match &vm.reason {
            Some(r) => Some(r.clone()),
            None if vm.observed == Observed::Pending => Some(self.waiting_for(&vm.spec).await),
            None => None,
        };
        let mut recent = self.backend.events_of(vm.id).await.unwrap_or_default();
        recent.drain(..recent.len().saturating_sub(RECENT_EVENTS));
        Ok(Shown { vm, why, recent })
    }

    /// What happened to the caller's VM `name`, oldest first.
    pub async fn events(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Vec<(Millis, String)>, OpError> {
        let vm = self.find(caller, name).await?;
        self.backend.events_of(vm.id).await
    }

    /// The caller's running VM `name` to run a command in (a write: a read-only token may not),
    /// as the View routes it (its private address and the agent's recorded key).
    pub fn exec_target(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<std::sync::Arc<boxd_model::view::VmRoute>, OpError> {
        caller.may_write(Some(name))?;
        let view = self.view.current();
        let vm = view
            .vm_by_name(name)
            .filter(|v| v.owner == caller.account)
            .ok_or_else(|| {
                OpError::new(ErrorKind::NotFound, format!("no VM named {name}: see `ls`"))
            })?;
        if vm.desired != Desired::Running || vm.private_ip.is_none() {
            return Err(OpError::new(
                ErrorKind::Refused,
                format!("{name} is not running: start it first"),
            ));
        }
        Ok(std::sync::Arc::clone(vm))
    }

    /// Deletes the caller's VM `name` and its disk.
    /// Deletes the caller's VM `name`. When its worker is silent, says so: the deletion is
    /// recorded, and the worker removes the VM's process and disk when it is back.
    pub async fn delete(&self, caller: &Caller, name: &str) -> Result<Option<String>, OpError> {
        caller.may_write(Some(name))?;
        let v = self.find(caller, name).await?;
        self.backend
            .write(Command::DeleteVm {
                by: caller.account,
                vm: v.id,
                at: self.backend.now(),
            })
            .await?;
        Ok(self
            .worker_silence(v.worker)
            .await
            .map(|why| format!("{why}: it removes the VM's process and disk when it is back")))
    }

    /// Asks the worker to stop the caller's VM `name` (its disk stays); does not wait.
    pub async fn stop(&self, caller: &Caller, name: &str) -> Result<(), OpError> {
        caller.may_write(Some(name))?;
        let v = self.find(caller, name).await?;
        self.set_desired(caller, &v, Desired::Stopped).await
    }

    /// Starts the caller's VM `name` and waits until it is reachable.
    pub async fn start(
        &self,
        caller: &Caller,
        name: &str,
        progress: &Progress,
    ) -> Result<Vm, OpError> {
        caller.may_write(Some(name))?;
        let v = self.find(caller, name).await?;
        self.set_desired(caller, &v, Desired::Running).await?;
        self.wait_running(caller, v.id, name, progress).await
    }

    /// Stops the caller's VM `name`, waits until it has, starts it and waits until it is
    /// reachable.
    pub async fn restart(
        &self,
        caller: &Caller,
        name: &str,
        progress: &Progress,
    ) -> Result<Vm, OpError> {
        self.stop(caller, name).await?;
        progress.line(format!("stopping {name}"));
        let v = self.find(caller, name).await?;
        self.wait_stopped(v.id, name).await?;
        self.start(caller, name, progress).await
    }

    async fn set_desired(&self, caller: &Caller, v: &Vm, desired: Desired) -> Result<(), OpError> {
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

    /// What a pending VM of `spec` waits for (see `capacity::waiting`).
    async fn waiting_for(&self, spec: &VmSpec) -> String {
        match self.backend.workers().await {
            Ok(ws) => crate::capacity::waiting(&ws, spec),
            Err(_) => "waiting for a worker with room".to_owned(),
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

    /// Waits until the VM is running and wired (a private address), reporting each state.
    async fn wait_running(
        &self,
        caller: &Caller,
        id: VmId,
        name: &str,
        progress: &Progress,
    ) -> Result<Vm, OpError> {
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
                return Err(OpError::new(
                    ErrorKind::NotFound,
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
                        let why = match self.find(caller, name).await {
                            Ok(vm) => self.waiting_for(&vm.spec).await,
                            Err(_) => "waiting for a worker with room".to_owned(),
                        };
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
                    return Err(OpError::new(
                        ErrorKind::Refused,
                        format!(
                            "{name} failed to start{why}; see `show {name}` and the worker's log"
                        ),
                    ));
                }
                Observed::Booting => {
                    let why = self.reason_of(caller, name).await;
                    return Err(OpError::new(
                        ErrorKind::Refused,
                        format!(
                            "{name} is booting but cannot finish on its worker{why}. It keeps its name and address; `rm {name}` removes it"
                        ),
                    ));
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(OpError::new(
                        ErrorKind::Unavailable,
                        "the node is shutting down",
                    ));
                }
                Err(_) => {
                    return Err(OpError::new(
                        ErrorKind::Timeout,
                        format!(
                            "{name} is not running after {} s (state: {observed}); it keeps starting in the background: see `show {name}`",
                            self.settings.ready_timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }

    /// Waits until the VM is neither running nor starting.
    async fn wait_stopped(&self, id: VmId, name: &str) -> Result<(), OpError> {
        let mut changes = self.view.subscribe();
        let deadline = tokio::time::Instant::now() + self.settings.ready_timeout;
        loop {
            match self.view.current().vm(id).map(|r| r.observed) {
                None => {
                    return Err(OpError::new(
                        ErrorKind::NotFound,
                        format!("{name} was deleted"),
                    ));
                }
                Some(Observed::Running | Observed::Starting) => {}
                Some(_) => return Ok(()),
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(OpError::new(
                        ErrorKind::Timeout,
                        format!("{name} did not stop in time; try `start {name}` later"),
                    ));
                }
            }
        }
    }
}

/// A name for a VM created without one: `vm-` and six random hex digits.
fn generated_name() -> String {
    format!("vm-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_names_are_valid() {
        for _ in 0..100 {
            let n = super::generated_name();
            assert_eq!(boxd_model::model::vm_name_problem(&n), None, "{n}");
        }
    }
}

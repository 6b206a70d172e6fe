//! Between the operations' types and the API's messages: VMs, keys, tokens, and `OpError`
//! kinds to status codes.

use boxd_model::model::{ApiToken, Desired, Observed, SshKey, Vm};
use boxd_operations::{ErrorKind, OpError, Operations};
use tonic::{Code, Status};

use crate::pb;

/// The status code and message of a refused operation.
pub fn status(e: OpError) -> Status {
    let code = match e.kind {
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Exists => Code::AlreadyExists,
        ErrorKind::Denied => Code::PermissionDenied,
        ErrorKind::Exhausted => Code::ResourceExhausted,
        ErrorKind::Refused => Code::FailedPrecondition,
        ErrorKind::Timeout => Code::DeadlineExceeded,
        ErrorKind::Unavailable => Code::Unavailable,
    };
    Status::new(code, e.message)
}

fn state(o: Observed) -> pb::VmState {
    match o {
        Observed::Pending => pb::VmState::Pending,
        Observed::Placed => pb::VmState::Placed,
        Observed::Starting => pb::VmState::Starting,
        Observed::Booting => pb::VmState::Booting,
        Observed::Running => pb::VmState::Running,
        Observed::Stopped => pb::VmState::Stopped,
        Observed::Failed => pb::VmState::Failed,
        Observed::Unknown => pb::VmState::Unknown,
    }
}

/// A VM as the API shows it.
pub fn vm(ops: &Operations, v: &Vm) -> pb::Vm {
    pb::Vm {
        id: v.id.to_string(),
        name: v.name.clone(),
        state: state(v.observed).into(),
        reason: v.reason.clone().unwrap_or_default(),
        want_running: v.desired == Desired::Running,
        address: v.public_ip.to_string(),
        vcpus: v.spec.vcpus,
        memory_mib: v.spec.memory_mib,
        disk_gib: v.spec.disk_gib,
        image: v.spec.image.clone(),
        ssh: ops.ssh_command(&v.name),
        https: ops.https_url(&v.name).unwrap_or_default(),
        created_at_ms: v.created_at,
    }
}

/// A key as the API shows it.
pub fn key(k: &SshKey) -> pb::Key {
    pb::Key {
        fingerprint: k.fingerprint.as_str().to_owned(),
        public_key: k.public_key.clone(),
        added_at_ms: k.added_at,
    }
}

/// A token's record as the API shows it.
pub fn token(t: &ApiToken) -> pb::Token {
    pb::Token {
        id: t.id.to_string(),
        label: t.name.clone(),
        vms: t.vms.clone(),
        read_only: t.read_only,
        created_at_ms: t.created_at,
        expires_at_ms: t.expires_at,
    }
}

//! `boxd vmm --config VM.json --api-sock PATH`: the per-VM process. It validates the config,
//! binds the API socket, builds the VM, starts the vCPUs parked, installs the seccomp filter,
//! lets the guest run, and exits when the guest resets or the API shuts it down.
//!
//! Exit status: 0 guest reset or API shutdown; 1 the VM failed while running; 2 invalid
//! config or unusable API socket (nothing started); 3 triple fault; 31 blocked syscall.
//! The API socket file is left behind when the VM ends (connecting to it is refused).

use std::path::Path;
use std::sync::Arc;

use crate::api;
use crate::config::VmConfig;
use crate::machine::Machine;

/// Options of `boxd vmm`.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// VM config (JSON).
    pub config: &'a Path,
    /// API socket path.
    pub api_sock: &'a Path,
    /// Install the seccomp filter (on unless debugging).
    pub seccomp: bool,
}

/// The start every VM process shares: outlive whoever started it (ignore SIGHUP from its
/// terminal) and bind the API socket. On failure the message is printed as `who: …` and the
/// exit status (2: nothing started) returned.
pub fn detach_and_bind(who: &str, api_sock: &Path) -> Result<std::os::unix::net::UnixListener, u8> {
    // SAFETY: SIG_IGN for SIGHUP changes no Rust-visible state.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    api::bind(api_sock).map_err(|e| {
        eprintln!("{who}: cannot use API socket {}: {e}", api_sock.display());
        2
    })
}

/// Runs the VM to its end; returns the process exit status.
pub fn run(opts: &Options<'_>) -> u8 {
    let cfg = match VmConfig::load(opts.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("boxd vmm: {e}");
            return 2;
        }
    };
    let listener = match detach_and_bind("boxd vmm", opts.api_sock) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let failed = |what: String| {
        eprintln!("boxd vmm: {what}");
        _ = std::fs::remove_file(opts.api_sock);
        1
    };
    let vm = match Machine::build(&cfg).and_then(Machine::start_paused) {
        Ok(r) => Arc::new(r),
        Err(e) => return failed(format!("cannot start the VM: {e}")),
    };
    let api_vm = vm.clone();
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    if let Err(e) = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            _ = up_tx.send(());
            api::serve(listener, api_vm);
        })
    {
        return failed(format!("cannot start the API thread: {e}"));
    }
    // The filter goes on only once the API thread runs its own code (see Machine::start_paused).
    _ = up_rx.recv();
    if opts.seccomp
        && let Err(e) = crate::seccomp::install()
    {
        return failed(format!("cannot install the seccomp filter: {e}"));
    }
    tracing::info!(
        vcpus = cfg.vcpus,
        memory_mib = cfg.memory_mib,
        kernel = %cfg.boot.kernel.display(),
        api = %opts.api_sock.display(),
        seccomp = opts.seccomp,
        "VM running"
    );
    vm.resume();
    let ending = vm.wait();
    match &ending {
        crate::Ending::Failed(m) => tracing::error!("VM failed: {m}"),
        e => tracing::info!(ending = ?e, "VM ended"),
    }
    // The socket file stays: unlink is outside the seccomp filter, and the next `bind` on this
    // path replaces a socket nobody answers on.
    ending.exit_code()
}

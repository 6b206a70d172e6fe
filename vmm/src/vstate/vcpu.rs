//! The vCPU run loop: `KVM_RUN`, then the exit decoded and handed to the device buses. A vCPU
//! thread stops or pauses when the shared run state says so; other threads interrupt its
//! `KVM_RUN` with a signal (see [`kick`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Effect;
use crate::vstate::control::{Control, Ending};

/// The signal that interrupts `KVM_RUN`: its handler does nothing, its arrival makes the ioctl
/// return `EINTR` so the thread looks at the run state.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler, without `SA_RESTART`, once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Runs vCPU `id` until the VM ends; returns why it stopped if this vCPU ended the VM.
pub fn run(id: u8, mut vcpu: VcpuFd, ctl: Arc<Control>) {
    loop {
        if !ctl.wait_runnable() {
            return;
        }
        let exit = vcpu.run();
        ctl.metrics.exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctl.metrics.io_exits.fetch_add(1, Ordering::Relaxed);
                ctl.pio.read(port, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctl.metrics.io_exits.fetch_add(1, Ordering::Relaxed);
                if ctl.pio.write(port, data) == Effect::Reset {
                    ctl.end(Ending::Reset);
                    return;
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctl.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
                ctl.pio.mmio_read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctl.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
                ctl.pio.mmio_write(addr, data);
            }
            Ok(VcpuExit::Hlt | VcpuExit::IrqWindowOpen) => {}
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: a PC resets. The VM process ends as on a guest reboot.
                ctl.end(Ending::TripleFault(id));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                ctl.end(Ending::Failed(format!(
                    "vCPU {id}: KVM internal error (on an emulated-KVM host this is an \
                     instruction KVM's emulator does not handle)"
                )));
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                ctl.end(Ending::Failed(format!(
                    "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
                )));
                return;
            }
            Ok(other) => {
                ctl.end(Ending::Failed(format!(
                    "vCPU {id}: unhandled exit {other:?}"
                )));
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                ctl.end(Ending::Failed(format!("vCPU {id}: KVM_RUN: {e}")));
                return;
            }
        }
    }
}

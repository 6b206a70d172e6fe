//! One VM from config to end: build (memory, kernel, boot tables, devices, vCPUs), run the
//! vCPU threads, pause/resume/shut down on request, and report why it ended.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::{boot, layout, mptable, regs};
use crate::config::VmConfig;
use crate::devices::PioBus;
use crate::devices::pci::PciBus;
use crate::devices::serial::{COM1_GSI, ConsoleOut, IrqTrigger, Uart};
use crate::devices::virtio::io::IoThread;
use crate::devices::virtio::net::{Net, parse_mac};
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{self, VirtioDevice, block::Block, pci::VirtioPci};
use crate::vstate::control::Control;
pub use crate::vstate::control::{Ending, Metrics, RunState};
use crate::vstate::vcpu;
use crate::vstate::vm::{Vm, VmError};

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// KVM or memory.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel, command line or initramfs.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Boot tables.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// A host resource (eventfd, log file, thread, signal handler).
    #[error("{0}: {1}")]
    Host(&'static str, std::io::Error),
}

/// A built VM, not yet running.
pub struct Machine {
    vm: Vm,
    vcpus: Vec<VcpuFd>,
    ctl: Arc<Control>,
    io: IoThread,
    _irq_evts: Vec<EventFd>,
}

/// A running VM: its vCPU threads and their shared control.
pub struct Running {
    _vm: Vm,
    threads: Mutex<Vec<JoinHandle<()>>>,
    io_stop: Option<EventFd>,
    ctl: Arc<Control>,
    _irq_evts: Vec<EventFd>,
}

impl Machine {
    /// Builds everything the config asks for; nothing runs yet.
    pub fn build(cfg: &VmConfig) -> Result<Self, StartError> {
        let vm = Vm::new(cfg.memory_mib)?;
        let mem = vm.memory();
        let loaded = boot::load_kernel(mem, &cfg.boot.kernel)?;
        boot::configure_linux(
            mem,
            cfg.memory_mib << 20,
            &cfg.boot.cmdline,
            &loaded,
            cfg.boot.initrd.as_deref(),
        )?;
        regs::write_boot_tables(mem)?;
        mptable::write(mem, cfg.vcpus)?;

        let serial_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| StartError::Host("eventfd", e))?;
        vm.register_irqfd(&serial_evt, COM1_GSI)?;
        let log = match &cfg.serial_log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| StartError::Host("opening the serial log", e))?,
            ),
            None => None,
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        let trigger = IrqTrigger(
            serial_evt
                .try_clone()
                .map_err(|e| StartError::Host("eventfd", e))?,
        );
        let uart = Uart::new(trigger, ConsoleOut::new(log, console.clone()));

        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
            let blk = Block::open(&d.path, d.read_only, &id).map_err(|e| {
                StartError::Host(
                    "opening a disk image",
                    std::io::Error::new(e.kind(), format!("{}: {e}", d.path.display())),
                )
            })?;
            devices.push(Box::new(blk));
        }
        for n in &cfg.net {
            let tap = Tap::open(&n.tap).map_err(|e| {
                StartError::Host(
                    "opening a tap",
                    std::io::Error::new(e.kind(), format!("{}: {e}", n.tap)),
                )
            })?;
            let mac = n
                .mac
                .as_deref()
                .and_then(parse_mac)
                .unwrap_or_else(|| default_mac(&n.tap));
            devices.push(Box::new(Net::new(tap, mac)));
        }
        if let Some(v) = &cfg.vsock {
            let dev = Vsock::new(v.guest_cid, &v.uds_path).map_err(|e| {
                StartError::Host(
                    "binding the vsock socket",
                    std::io::Error::new(e.kind(), format!("{}: {e}", v.uds_path.display())),
                )
            })?;
            devices.push(Box::new(dev));
        }
        let mut functions = Vec::new();
        let mut irq_evts = Vec::new();
        for (slot, dev) in devices.into_iter().enumerate() {
            let gsi = layout::PCI_IRQS[slot];
            let evt =
                EventFd::new(libc::EFD_NONBLOCK).map_err(|e| StartError::Host("eventfd", e))?;
            vm.register_irqfd(&evt, u32::from(gsi))?;
            let bar = layout::PCI_MMIO_BASE + slot as u64 * virtio::pci::BAR_SIZE;
            let f = VirtioPci::new(
                dev,
                mem.clone(),
                bar as u32,
                gsi,
                evt.try_clone()
                    .map_err(|e| StartError::Host("eventfd", e))?,
            )
            .map_err(|e| StartError::Host("virtio queue", std::io::Error::other(e.to_string())))?;
            irq_evts.push(evt);
            functions.push(Arc::new(Mutex::new(f)));
        }
        let io = IoThread::new(&functions).map_err(|e| StartError::Host("epoll", e))?;

        let vcpus = (0..cfg.vcpus)
            .map(|id| vm.create_vcpu(id, cfg.vcpus, loaded.entry))
            .collect::<Result<Vec<_>, _>>()?;
        let ctl = Arc::new(Control::new(
            PioBus::new(uart, PciBus::new(functions)),
            console,
            cfg.vcpus,
            cfg.memory_mib,
        ));
        irq_evts.push(serial_evt);
        Ok(Self {
            vm,
            vcpus,
            ctl,
            io,
            _irq_evts: irq_evts,
        })
    }

    /// Starts one thread per vCPU, running.
    pub fn start(self) -> Result<Running, StartError> {
        let r = self.start_paused()?;
        r.resume();
        Ok(r)
    }

    /// Starts one thread per vCPU, parked until [`Running::resume`]: the caller can finish
    /// setting up the process (API thread, seccomp filter) before the guest runs.
    pub fn start_paused(self) -> Result<Running, StartError> {
        self.ctl.set_run(RunState::Paused);
        vcpu::install_kick_handler().map_err(|e| StartError::Host("signal handler", e))?;
        let mut threads = Vec::new();
        for (id, fd) in self.vcpus.into_iter().enumerate() {
            let ctl = self.ctl.clone();
            let id = id as u8;
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(id, fd, ctl))
                .map_err(|e| StartError::Host("starting a vCPU thread", e))?;
            threads.push(t);
        }
        // The device I/O thread, when a device waits on host descriptors. It reports in before
        // start_paused returns, for the same reason as the vCPUs below.
        let mut io_stop = None;
        if !self.io.is_empty() {
            io_stop = Some(
                self.io
                    .stopper()
                    .map_err(|e| StartError::Host("eventfd", e))?,
            );
            let (up_tx, up_rx) = std::sync::mpsc::channel();
            let io = self.io;
            let t = std::thread::Builder::new()
                .name("devices".into())
                .spawn(move || {
                    _ = up_tx.send(());
                    io.run();
                })
                .map_err(|e| StartError::Host("starting the device I/O thread", e))?;
            _ = up_rx.recv();
            threads.push(t);
        }
        // Every vCPU thread is past its start-up (glibc registers rseq, sets its signal mask)
        // and parked before this returns, so a seccomp filter installed next applies to
        // threads that only run the loop.
        let n = usize::from(self.ctl.vcpus);
        while self.ctl.parked() < n {
            if threads.iter().take(n).any(JoinHandle::is_finished) {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(Running {
            _vm: self.vm,
            threads: Mutex::new(threads),
            io_stop,
            ctl: self.ctl,
            _irq_evts: self._irq_evts,
        })
    }
}

impl Running {
    /// The shared control (state, metrics, console).
    pub fn control(&self) -> &Arc<Control> {
        &self.ctl
    }

    fn kick_until(&self, mut done: impl FnMut(&[JoinHandle<()>]) -> bool) {
        let threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        // A kick that lands between the vCPU's state check and its KVM_RUN is lost, so kick
        // again until every vCPU has noticed.
        for _ in 0..5000 {
            if done(&threads) {
                return;
            }
            for t in threads.iter().filter(|t| !t.is_finished()) {
                _ = t.kill(vcpu::kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::warn!("vCPUs did not answer kicks within 5 s");
    }

    /// Parks every vCPU; returns once all are parked. False if the VM is not running.
    pub fn pause(&self) -> bool {
        if self.ctl.set_run(RunState::Paused) != RunState::Running {
            return self.ctl.run_state() == RunState::Paused;
        }
        let n = usize::from(self.ctl.vcpus);
        self.kick_until(|_| self.ctl.parked() >= n);
        true
    }

    /// Lets parked vCPUs run again. False if the VM has ended.
    pub fn resume(&self) -> bool {
        self.ctl.set_run(RunState::Running) != RunState::Stopped
    }

    /// Ends the VM and waits for the vCPU threads; returns why it ended.
    pub fn stop(&self, why: Ending) -> Ending {
        self.ctl.end(why);
        if let Some(s) = &self.io_stop {
            _ = s.write(1);
        }
        self.kick_until(|ts| ts.iter().all(JoinHandle::is_finished));
        self.ctl.wait_end()
    }

    /// Blocks until the VM ends by itself or is stopped, then reaps the vCPUs.
    pub fn wait(&self) -> Ending {
        let e = self.ctl.wait_end();
        self.stop(e)
    }
}

/// A locally administered MAC from the tap name: 52:54:00 and three bytes of its FNV-1a hash.
fn default_mac(tap: &str) -> [u8; 6] {
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    [0x52, 0x54, 0x00, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

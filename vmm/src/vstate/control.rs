//! What the vCPU threads and the API share about one running VM: its run state (running,
//! paused, stopped, and why it ended), legacy port I/O, counters and the console's tail.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use crate::devices::PioBus;

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The guest reset the machine (i8042), as Linux's `reboot` does: a clean end.
    Reset,
    /// A vCPU triple-faulted; a PC would reset.
    TripleFault(u8),
    /// Shut down through the API.
    Shutdown,
    /// Something went wrong; the message says what.
    Failed(String),
}

impl Ending {
    /// The VMM process's exit code for this ending.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Reset | Self::Shutdown => 0,
            Self::TripleFault(_) => 3,
            Self::Failed(_) => 1,
        }
    }
}

/// Run state as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
    /// The VM has ended or is ending.
    Stopped,
}

/// Counters for `GET /metrics`.
#[derive(Default, Debug)]
pub struct Metrics {
    /// All vCPU exits.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub io_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
}

struct State {
    run: RunState,
    ending: Option<Ending>,
}

/// What the vCPU threads and the API share.
pub struct Control {
    state: Mutex<State>,
    changed: Condvar,
    parked: AtomicUsize,
    /// Legacy port I/O devices.
    pub pio: PioBus,
    /// Counters.
    pub metrics: Metrics,
    /// The most recent console output.
    pub console: Arc<Mutex<Vec<u8>>>,
    /// When the vCPUs started.
    pub started: Instant,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl Control {
    /// A running VM's shared state.
    pub fn new(pio: PioBus, console: Arc<Mutex<Vec<u8>>>, vcpus: u8, memory_mib: u64) -> Self {
        Self {
            state: Mutex::new(State {
                run: RunState::Running,
                ending: None,
            }),
            changed: Condvar::new(),
            parked: AtomicUsize::new(0),
            pio,
            metrics: Metrics::default(),
            console,
            started: Instant::now(),
            vcpus,
            memory_mib,
        }
    }

    /// How many vCPU threads are parked (paused and waiting).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks while paused; false once the VM is ending.
    pub fn wait_runnable(&self) -> bool {
        let mut s = self.lock();
        loop {
            match s.run {
                RunState::Running => return true,
                RunState::Stopped => return false,
                RunState::Paused => {
                    self.parked.fetch_add(1, Ordering::SeqCst);
                    s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                    self.parked.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Ends the VM (the first ending wins).
    pub fn end(&self, why: Ending) {
        let mut s = self.lock();
        if s.ending.is_none() {
            s.ending = Some(why);
        }
        s.run = RunState::Stopped;
        self.changed.notify_all();
    }

    /// Current run state.
    pub fn run_state(&self) -> RunState {
        self.lock().run
    }

    /// Blocks until the VM ends.
    pub fn wait_end(&self) -> Ending {
        let mut s = self.lock();
        loop {
            if let Some(e) = &s.ending {
                return e.clone();
            }
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Moves to `to` unless the VM is stopped; returns the state it was in.
    pub fn set_run(&self, to: RunState) -> RunState {
        let mut s = self.lock();
        let was = s.run;
        if was != RunState::Stopped {
            s.run = to;
            self.changed.notify_all();
        }
        was
    }
}

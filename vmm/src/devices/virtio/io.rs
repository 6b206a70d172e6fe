//! The device I/O thread: waits (epoll, edge-triggered) on the host descriptors of every
//! device — taps, sockets — and on a stop eventfd, and hands each readiness to its device
//! through the transport, which raises the guest interrupt.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::pci::VirtioPci;

/// What the I/O thread watches.
pub struct IoThread {
    epoll: Epoll,
    stop: EventFd,
    watched: Vec<(RawFd, Arc<Mutex<VirtioPci>>)>,
}

const STOP: u64 = u64::MAX;

impl IoThread {
    /// Registers every host descriptor of `functions`.
    pub fn new(functions: &[Arc<Mutex<VirtioPci>>]) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let mut watched = Vec::new();
        for f in functions {
            let fds = f.lock().unwrap_or_else(PoisonError::into_inner).host_fds();
            for fd in fds {
                let key = watched.len() as u64;
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, key),
                )?;
                watched.push((fd, f.clone()));
            }
        }
        Ok(Self {
            epoll,
            stop,
            watched,
        })
    }

    /// Whether there is anything to watch.
    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// An eventfd that ends [`Self::run`] when written.
    pub fn stopper(&self) -> std::io::Result<EventFd> {
        self.stop.try_clone()
    }

    /// Dispatches readiness until stopped.
    pub fn run(self) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "device I/O thread: epoll");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == STOP {
                    return;
                }
                if let Some((fd, f)) = usize::try_from(ev.data())
                    .ok()
                    .and_then(|i| self.watched.get(i))
                {
                    f.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .host_event(*fd);
                }
            }
        }
    }
}

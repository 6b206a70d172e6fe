//! The 8250 UART on 0x3f8 (COM1), from vm-superio. Output goes to a writer (the serial log,
//! and a copy kept for the API); the interrupt line is an eventfd registered as KVM irqfd on
//! GSI 4.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// I/O port base of COM1.
pub const COM1: u16 = 0x3f8;
/// Its interrupt line.
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Where console output goes: a log file, plus the most recent output kept in memory.
pub struct ConsoleOut {
    log: Option<std::fs::File>,
    tail: Arc<Mutex<Vec<u8>>>,
}

/// Bytes of console output kept in memory.
const TAIL: usize = 64 * 1024;

impl ConsoleOut {
    /// Output to `log` (if any), keeping the tail in `tail`.
    pub fn new(log: Option<std::fs::File>, tail: Arc<Mutex<Vec<u8>>>) -> Self {
        Self { log, tail }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &mut self.log {
            f.write_all(buf)?;
        }
        let mut t = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        t.extend_from_slice(buf);
        if t.len() > TAIL {
            let cut = t.len() - TAIL;
            t.drain(..cut);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(f) = &mut self.log {
            f.flush()?;
        }
        Ok(())
    }
}

/// The UART as the bus sees it.
pub type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>;

//! Emulated devices and the port-I/O bus the vCPUs dispatch to. Device logic is here; the
//! exits that reach it are decoded in `vstate::vcpu`.

pub mod pci;
pub mod serial;
pub mod virtio;

use std::sync::{Mutex, PoisonError};

use pci::PciBus;
use serial::{COM1, Uart};

/// What a port write asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the device's own state.
    None,
    /// The guest asked for a reset (i8042 pulse): the VM process ends.
    Reset,
}

/// i8042 controller: enough for a guest to find it and to reset the machine.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// The guest's buses: port I/O (COM1, the i8042, PCI configuration) and MMIO (PCI BARs).
/// Anything else reads as all-ones (no device) and ignores writes, as on a PC with nothing
/// there.
pub struct PioBus {
    uart: Mutex<Uart>,
    /// PCI bus 0.
    pub pci: PciBus,
}

impl PioBus {
    /// Buses with this UART and these PCI functions.
    pub fn new(uart: Uart, pci: PciBus) -> Self {
        Self {
            uart: Mutex::new(uart),
            pci,
        }
    }

    /// An MMIO read: a PCI BAR, or all-ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    /// An MMIO write: a PCI BAR, or ignored.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.pci.mmio_write(addr, data);
    }

    /// A guest read of `data.len()` bytes at `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                data[0] = self
                    .uart
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read((p - COM1) as u8);
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => data[0] = 0,
            0xcf8..=0xcff => self.pci.pio_read(port, data),
            _ => data.fill(0xff),
        }
    }

    /// A guest write at `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> Effect {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                let r = self
                    .uart
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write((p - COM1) as u8, data[0]);
                if let Err(e) = r {
                    tracing::warn!(error = ?e, "serial write");
                }
                Effect::None
            }
            I8042_COMMAND if data == [I8042_RESET] => Effect::Reset,
            0xcf8..=0xcff => {
                self.pci.pio_write(port, data);
                Effect::None
            }
            _ => Effect::None,
        }
    }
}

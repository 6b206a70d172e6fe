//! Emulated devices and the port-I/O bus the vCPUs dispatch to. Device logic is here; the
//! exits that reach it are decoded in `vstate::vcpu`.

pub mod serial;

use std::sync::{Mutex, PoisonError};

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

/// Legacy port I/O: COM1 and the i8042. Everything else reads as all-ones (no device) and
/// ignores writes, as on a PC with nothing there.
pub struct PioBus {
    uart: Mutex<Uart>,
}

impl PioBus {
    /// A bus with this UART.
    pub fn new(uart: Uart) -> Self {
        Self {
            uart: Mutex::new(uart),
        }
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
            _ => Effect::None,
        }
    }
}

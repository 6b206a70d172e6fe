//! PCI bus 0 through configuration mechanism #1 (ports 0xcf8/0xcfc): a host bridge at
//! device 0 and the virtio functions at devices 1.., plus the MMIO dispatch to their BARs.

use std::sync::{Arc, Mutex, PoisonError};

use super::virtio::pci::VirtioPci;

/// Configuration address port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// Configuration data ports.
pub const CONFIG_DATA: u16 = 0xcfc;

/// Bus 0.
pub struct PciBus {
    address: Mutex<u32>,
    functions: Vec<Arc<Mutex<VirtioPci>>>,
}

/// Host bridge config space: Intel 440FX-style ids, class "host bridge".
fn host_bridge(reg: u8) -> u32 {
    match reg {
        0x00 => 0x1237_8086,
        0x08 => 0x0600_0000,
        _ => 0,
    }
}

impl PciBus {
    /// A bus holding these functions at devices 1, 2, ...
    pub fn new(functions: Vec<Arc<Mutex<VirtioPci>>>) -> Self {
        Self {
            address: Mutex::new(0),
            functions,
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// (device, register) the address port selects, if it selects something on bus 0, fn 0.
    fn selected(&self) -> Option<(u8, u8)> {
        let a = *Self::lock(&self.address);
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let dev = ((a >> 11) & 0x1f) as u8;
        let func = (a >> 8) & 0x7;
        (enabled && bus == 0 && func == 0).then_some((dev, (a & 0xfc) as u8))
    }

    /// A port read in 0xcf8..=0xcff.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&Self::lock(&self.address).to_le_bytes());
            return;
        }
        let Some(off) = port.checked_sub(CONFIG_DATA).filter(|o| *o < 4) else {
            return;
        };
        let Some((dev, reg)) = self.selected() else {
            return;
        };
        let at = reg + off as u8;
        if dev == 0 {
            let v = host_bridge(reg).to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.get(usize::from(off) + i).copied().unwrap_or(0xff);
            }
        } else if let Some(f) = self.functions.get(usize::from(dev) - 1) {
            Self::lock(f).config_read(at, data);
        }
    }

    /// A port write in 0xcf8..=0xcff.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            *Self::lock(&self.address) = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return;
        }
        let Some(off) = port.checked_sub(CONFIG_DATA).filter(|o| *o < 4) else {
            return;
        };
        if let Some((dev, reg)) = self.selected()
            && dev > 0
            && let Some(f) = self.functions.get(usize::from(dev) - 1)
        {
            Self::lock(f).config_write(reg + off as u8, data);
        }
    }

    fn function_at(&self, addr: u64) -> Option<(std::sync::MutexGuard<'_, VirtioPci>, u64)> {
        self.functions.iter().find_map(|f| {
            let g = Self::lock(f);
            match g.bar_range() {
                Some((base, size)) if (base..base + size).contains(&addr) => Some((g, addr - base)),
                _ => None,
            }
        })
    }

    /// An MMIO read; false if no BAR claims the address.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.function_at(addr) {
            Some((mut f, off)) => {
                f.bar_read(off, data);
                true
            }
            None => false,
        }
    }

    /// An MMIO write; false if no BAR claims the address.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.function_at(addr) {
            Some((mut f, off)) => {
                f.bar_write(off, data);
                true
            }
            None => false,
        }
    }
}

//! The virtio-PCI modern transport (virtio 1.x, section 4.1): a PCI function whose BAR 0
//! holds the common configuration, ISR status, device configuration and notification
//! regions, each announced by a vendor-specific capability. Interrupts are INTx through an
//! irqfd on the function's own interrupt line (MSI-X is not offered yet; drivers fall back).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{F_VERSION_1, VirtioDevice};

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const NO_VECTOR: u16 = 0xffff;

/// Device status bits.
mod status {
    pub const FEATURES_OK: u8 = 8;
    pub const DRIVER_OK: u8 = 4;
    pub const FAILED: u8 = 0x80;
}

/// One virtio device on PCI.
pub struct VirtioPci {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    config: [u8; 256],
    bar: u32,
    bar_sizing: bool,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    isr: u8,
}

fn put16(c: &mut [u8], at: usize, v: u16) {
    c[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(c: &mut [u8], at: usize, v: u32) {
    c[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Little-endian value of `data` (1, 2, 4 or 8 bytes).
fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn set_le(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

impl VirtioPci {
    /// Wraps `device`; BAR 0 at `bar` (32-bit MMIO), interrupt line `gsi` raised through `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        bar: u32,
        gsi: u8,
        irq: EventFd,
    ) -> Result<Self, virtio_queue::Error> {
        let mut c = [0u8; 256];
        put16(&mut c, 0x00, VIRTIO_PCI_VENDOR);
        put16(&mut c, 0x02, 0x1040 + device.device_type());
        put16(&mut c, 0x06, 0x10); // status: capabilities list
        c[0x08] = 1; // revision: modern
        let class = device.pci_class();
        c[0x09] = class as u8;
        c[0x0a] = (class >> 8) as u8;
        c[0x0b] = (class >> 16) as u8;
        put16(&mut c, 0x2c, VIRTIO_PCI_VENDOR);
        put16(&mut c, 0x2e, 0x40); // subsystem id >= 0x40 for modern-only devices
        c[0x34] = 0x40;
        c[0x3c] = gsi;
        c[0x3d] = 1; // INTA#
        // Vendor capabilities: (at, type, offset, length, next).
        let caps: [(usize, u8, u64, u64, u8); 4] = [
            (0x40, 1, COMMON, COMMON_LEN, 0x50),
            (0x50, 3, ISR, 1, 0x60),
            (0x60, 4, DEVICE_CFG, 0x1000, 0x70),
            (0x70, 2, NOTIFY, 0x1000, 0),
        ];
        for (at, ty, off, len, next) in caps {
            c[at] = 0x09;
            c[at + 1] = next;
            c[at + 2] = if ty == 2 { 20 } else { 16 };
            c[at + 3] = ty;
            c[at + 4] = 0; // BAR 0
            put32(&mut c, at + 8, off as u32);
            put32(&mut c, at + 12, len as u32);
        }
        put32(&mut c, 0x70 + 16, NOTIFY_MULTIPLIER);
        // Memory decoding on, as firmware leaves a device whose BAR it assigned.
        put16(&mut c, 0x04, 0x2);
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|m| Queue::new(*m))
            .collect::<Result<_, _>>()?;
        let mut s = Self {
            device,
            mem,
            irq,
            config: c,
            bar,
            bar_sizing: false,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            isr: 0,
        };
        s.write_bar_register();
        Ok(s)
    }

    fn write_bar_register(&mut self) {
        let v = if self.bar_sizing {
            !(BAR_SIZE as u32 - 1)
        } else {
            self.bar
        };
        put32(&mut self.config, 0x10, v);
    }

    /// Where BAR 0 is now (the guest may move it).
    pub fn bar_range(&self) -> Option<(u64, u64)> {
        // With memory decoding off (command bit 1), or while being sized, the BAR does not
        // answer.
        (self.config[0x04] & 0x2 != 0 && !self.bar_sizing)
            .then_some((u64::from(self.bar), BAR_SIZE))
    }

    /// A configuration-space read of `data.len()` bytes at `offset`.
    pub fn config_read(&self, offset: u8, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self
                .config
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A configuration-space write: the command register, BAR 0 and the interrupt line are
    /// writable; everything else is read-only.
    pub fn config_write(&mut self, offset: u8, data: &[u8]) {
        match (offset, data.len()) {
            (0x04, 2 | 4) => {
                let cmd = le(&data[..2]) as u16 & 0x0407; // I/O, memory, bus master, INTx disable
                put16(&mut self.config, 0x04, cmd);
            }
            (0x10, 4) => {
                let v = le(data) as u32;
                if v == 0xffff_ffff {
                    self.bar_sizing = true;
                } else {
                    self.bar_sizing = false;
                    self.bar = v & !(BAR_SIZE as u32 - 1);
                }
                self.write_bar_register();
            }
            (0x3c, 1) => self.config[0x3c] = data[0],
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.isr = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// A read of BAR 0 at `offset`.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if (COMMON..COMMON + COMMON_LEN).contains(&o) => {
                let v: u64 = match (o, data.len()) {
                    (0x00, 4) => u64::from(self.device_feature_select),
                    (0x04, 4) => match self.device_feature_select {
                        0 => self.offered() & 0xffff_ffff,
                        1 => self.offered() >> 32,
                        _ => 0,
                    },
                    (0x08, 4) => u64::from(self.driver_feature_select),
                    (0x0c, 4) => match self.driver_feature_select {
                        0 => self.driver_features & 0xffff_ffff,
                        1 => self.driver_features >> 32,
                        _ => 0,
                    },
                    (0x10, 2) => u64::from(NO_VECTOR),
                    (0x12, 2) => self.queues.len() as u64,
                    (0x14, 1) => u64::from(self.status),
                    (0x15, 1) => 0,
                    (0x16, 2) => u64::from(self.queue_select),
                    (0x18, 2) => self.queue().map_or(0, |q| u64::from(q.size())),
                    (0x1a, 2) => u64::from(NO_VECTOR),
                    (0x1c, 2) => self.queue().map_or(0, |q| u64::from(q.ready())),
                    (0x1e, 2) => u64::from(self.queue_select),
                    (0x20, 4 | 8) => self.queue().map_or(0, |q| q.desc_table()),
                    (0x24, 4) => self.queue().map_or(0, |q| q.desc_table() >> 32),
                    (0x28, 4 | 8) => self.queue().map_or(0, |q| q.avail_ring()),
                    (0x2c, 4) => self.queue().map_or(0, |q| q.avail_ring() >> 32),
                    (0x30, 4 | 8) => self.queue().map_or(0, |q| q.used_ring()),
                    (0x34, 4) => self.queue().map_or(0, |q| q.used_ring() >> 32),
                    _ => 0,
                };
                set_le(data, v);
            }
            ISR => {
                // Reading the ISR acknowledges the interrupt.
                data[0] = self.isr;
                self.isr = 0;
            }
            o if (DEVICE_CFG..DEVICE_CFG + 0x1000).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data);
            }
            _ => {}
        }
    }

    /// A write to BAR 0 at `offset`.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let v = le(data);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            // Features are fixed once FEATURES_OK is set.
            (0x0c, 4) if self.status & status::FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | ((v << shift) & mask & self.offered());
            }
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            (0x1c, 2) => {
                let mem = self.mem.clone();
                if let Some(q) = self.queue() {
                    // virtio-queue checks a queue only once it is marked ready: a queue whose
                    // rings lie outside guest memory or are misaligned stays disabled.
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(&mem) {
                        q.set_ready(false);
                    }
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) | (0x20 | 0x28 | 0x30, 8) => {
                let (lo, hi) = if data.len() == 8 {
                    (Some(v as u32), Some((v >> 32) as u32))
                } else if offset.is_multiple_of(8) {
                    (Some(v as u32), None)
                } else {
                    (None, Some(v as u32))
                };
                if let Some(q) = self.queue() {
                    match offset & !7 {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            (o, _) if (DEVICE_CFG..DEVICE_CFG + 0x1000).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data);
            }
            (o, 2 | 4) if (NOTIFY..NOTIFY + 0x1000).contains(&o) => {
                let index = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as u16;
                self.notify(index);
            }
            _ => {}
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & status::FEATURES_OK != 0
            && self.status & status::FEATURES_OK == 0
            && self.driver_features & F_VERSION_1 == 0
        {
            // Only the modern interface is offered: refuse a driver that did not accept it.
            v &= !status::FEATURES_OK;
        }
        let activating = v & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = v;
        if activating && v & status::FAILED == 0 {
            self.device.activate(self.driver_features);
        }
    }

    /// The guest notified queue `index`.
    pub fn notify(&mut self, index: u16) {
        if self.status & status::DRIVER_OK == 0 {
            return;
        }
        if !self
            .queues
            .get(usize::from(index))
            .is_some_and(QueueT::ready)
        {
            return;
        }
        if self
            .device
            .process_queue(index, &mut self.queues, &self.mem)
        {
            self.raise();
        }
    }

    /// Host descriptors the device waits on.
    pub fn host_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.device.host_fds()
    }

    /// A host descriptor of the device became ready.
    pub fn host_event(&mut self, fd: std::os::fd::RawFd) {
        if self.status & status::DRIVER_OK == 0 {
            return;
        }
        if self.device.host_event(fd, &mut self.queues, &self.mem) {
            self.raise();
        }
    }

    /// Interrupts the guest for used buffers.
    pub fn raise(&mut self) {
        self.isr |= 1;
        if self.config[0x05] & 0x04 == 0 {
            // INTx not disabled by the command register.
            _ = self.irq.write(1);
        }
    }
}

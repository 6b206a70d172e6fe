//! virtio devices (logic: queues in, completions out) and the virtio-PCI transport that wires
//! them to the guest. A device never sees PCI, eventfds or threads: the transport hands it a
//! queue and guest memory when the guest notifies, and raises the interrupt it asks for.

pub mod block;
pub mod io;
pub mod net;
pub mod pci;
pub mod tap;
pub mod vsock;

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the modern (virtio 1.x) interface, the only one offered.
pub const F_VERSION_1: u64 = 1 << 32;

/// A virtio device's logic.
pub trait VirtioDevice: Send {
    /// virtio device type (2 = block, 1 = net, 19 = vsock).
    fn device_type(&self) -> u16;
    /// PCI class code (class, subclass, prog-if) for the transport.
    fn pci_class(&self) -> u32;
    /// Largest size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes the device-specific configuration space (ignored unless meaningful).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these accepted features.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The guest made buffers available on queue `index` of `queues`: consume them. Returns
    /// whether the guest should be interrupted.
    fn process_queue(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// Host file descriptors whose readiness the device waits for (a tap, sockets), watched
    /// edge-triggered by the I/O thread.
    fn host_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `fd` (one of [`Self::host_fds`]) became ready. Returns whether to interrupt the guest.
    fn host_event(&mut self, _fd: RawFd, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
}

/// Copies `src` (a little-endian config structure) into `data` from `offset`, reading zeros
/// past its end.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

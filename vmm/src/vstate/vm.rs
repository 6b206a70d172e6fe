//! The KVM VM: guest memory split around the 32-bit MMIO gap and registered with KVM, the
//! in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, and vCPUs set up for 64-bit boot.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{layout, regs};

/// Why the VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Open(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory {
        /// Requested size.
        mib: u64,
        /// Cause.
        reason: String,
    },
    /// Setting up a vCPU failed.
    #[error("vCPU {0}: {1}")]
    Vcpu(u8, regs::RegsError),
}

/// Address of the TSS KVM needs on Intel (three pages below the BIOS area top).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A VM with its memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
}

/// The guest-physical RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(layout::MMIO_GAP_START);
    let mut r = vec![(GuestAddress(0), low as usize)];
    if size > low {
        r.push((
            GuestAddress(layout::MMIO_GAP_START + layout::MMIO_GAP_SIZE),
            (size - low) as usize,
        ));
    }
    r
}

impl Vm {
    /// Creates the VM with `memory_mib` MiB of RAM, an in-kernel irqchip and a PIT.
    pub fn new(memory_mib: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Open)?;
        let fd = kvm.create_vm().map_err(|e| VmError::Kvm("create_vm", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Kvm("set_tss_address", e))?;
        let size = memory_mib << 20;
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|e| VmError::Memory {
            mib: memory_mib,
            reason: e.to_string(),
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which this VM holds for as
            // long as the VM fd exists, and the slots do not overlap.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("set_user_memory_region", e))?;
        }
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("create_irq_chip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("create_pit2", e))?;
        Ok(Self { kvm, fd, mem })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Routes an eventfd to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Kvm("register_irqfd", e))
    }

    /// Creates vCPU `id` of `count`, ready to start at `entry` in long mode.
    pub fn create_vcpu(&self, id: u8, count: u8, entry: u64) -> Result<VcpuFd, VmError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Kvm("create_vcpu", e))?;
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("get_supported_cpuid", e))?;
        regs::filter_cpuid(&mut cpuid, id, count);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmError::Kvm("set_cpuid2", e))?;
        let v = |e| VmError::Vcpu(id, e);
        regs::setup_msrs(&vcpu).map_err(v)?;
        regs::setup_lint(&vcpu).map_err(v)?;
        if id == 0 {
            // The bootstrap processor starts at the entry; the others wait for INIT/SIPI from
            // the guest, as on real hardware.
            regs::setup_sregs(&vcpu).map_err(v)?;
            regs::setup_regs(&vcpu, entry).map_err(v)?;
            regs::setup_fpu(&vcpu).map_err(v)?;
        }
        Ok(vcpu)
    }
}

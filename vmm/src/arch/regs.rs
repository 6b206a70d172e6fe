//! Putting a vCPU into 64-bit long mode at an entry point: GDT/IDT and page tables in guest
//! memory, segment and control registers, general registers, FPU, MSRs, LAPIC LINT pins and
//! CPUID. The vCPU then starts the way Linux's 64-bit boot protocol expects.

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{gdt, layout};

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("KVM {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Writing boot structures into guest memory failed.
    #[error("writing {0} into guest memory: {1}")]
    Memory(&'static str, vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Writes the GDT, IDT and identity-mapping page tables (first 4 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in gdt::TABLE.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT + (i as u64) * 8))
            .map_err(|e| RegsError::Memory("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))
        .map_err(|e| RegsError::Memory("IDT", e))?;
    mem.write_obj(layout::PDPTE | 0x03, GuestAddress(layout::PML4))
        .map_err(|e| RegsError::Memory("PML4", e))?;
    // Four page directories of 2 MiB pages identity-map the first 4 GiB, so a guest reaches
    // PCI BARs in the 32-bit MMIO gap before it builds page tables of its own.
    for d in 0..4u64 {
        let pd = layout::PDE + d * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(layout::PDPTE + d * 8))
            .map_err(|e| RegsError::Memory("PDPTE", e))?;
        for i in 0..512u64 {
            mem.write_obj(((d << 30) | (i << 21)) | 0x83, GuestAddress(pd + i * 8))
                .map_err(|e| RegsError::Memory("PDE", e))?;
        }
    }
    Ok(())
}

/// Sets segment, control and paging registers for long mode.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut s = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("get_sregs", e))?;
    s.gdt.base = layout::BOOT_GDT;
    s.gdt.limit = (std::mem::size_of_val(&gdt::TABLE) - 1) as u16;
    s.idt.base = layout::BOOT_IDT;
    s.idt.limit = 7;
    let data = gdt::segment(2);
    s.cs = gdt::segment(1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = gdt::segment(3);
    s.cr3 = layout::PML4;
    s.cr4 |= X86_CR4_PAE;
    s.cr0 |= X86_CR0_PE | X86_CR0_PG;
    s.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&s)
        .map_err(|e| RegsError::Kvm("set_sregs", e))
}

/// Sets the general registers: entry point, stack, and `rsi` pointing at the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("set_regs", e))
}

/// Sets the FPU to its reset state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("set_fpu", e))
}

/// Boot MSRs: fast strings enabled, everything else cleared.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| RegsError::Kvm("msrs", kvm_ioctls::Error::new(libc::EINVAL)))?;
    vcpu.set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("set_msrs", e))?;
    Ok(())
}

/// LINT0 as ExtINT and LINT1 as NMI, as a PC's BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("get_lapic", e))?;
    let mut set = |offset: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    };
    set(APIC_LVT0, APIC_MODE_EXTINT);
    set(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("set_lapic", e))
}

/// The host's supported CPUID, adjusted per vCPU: its APIC id, the vCPU count, and the
/// hypervisor bit set.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, vcpus: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processor count.
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(vcpu_id) << 24) | (u32::from(vcpus) << 16);
                // ECX[31]: running under a hypervisor.
                e.ecx |= 1 << 31;
                // EDX[28]: HTT when more than one logical processor.
                if vcpus > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb => {
                // Extended topology: x2APIC id of this vCPU.
                e.edx = u32::from(vcpu_id);
            }
            _ => {}
        }
    }
}

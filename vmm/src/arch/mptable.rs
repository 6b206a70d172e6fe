//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns how many
//! CPUs it has, where the IOAPIC is and how ISA interrupts are routed. Linux reads it when ACPI
//! is absent (`acpi=off` or no RSDP), so an SMP guest sees every vCPU.
//!
//! Written as bytes rather than `#[repr(packed)]` structs: every field is little-endian, the
//! layout is fixed by the spec, and byte offsets keep it free of `unsafe`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Local APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
/// Pins of the in-kernel IOAPIC.
const IOAPIC_PINS: u8 = 24;

/// Why the table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than the table has room for.
    #[error("{0} vCPUs do not fit in the MP table")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("writing the MP table: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and the configuration table for `cpus` vCPUs, to live at `at`.
pub fn build(cpus: u8, at: u64) -> Result<Vec<u8>, MpTableError> {
    let size = 16 + 44 + 20 * usize::from(cpus) + 8 + 8 + 8 * usize::from(IOAPIC_PINS) + 16;
    if cpus == 0 || cpus > crate::config::MAX_VCPUS || size > 1024 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut t = Vec::with_capacity(size - 16);
    // Configuration table header; length, entry count and checksum are filled in below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&[0, 0, 4, 0]);
    t.extend_from_slice(b"BOXD    ");
    t.extend_from_slice(b"000000000000");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count
    t.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    let mut entries: u16 = 0;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        t.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        t.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        t.extend_from_slice(&0x201u32.to_le_bytes()); // feature flags: FPU, APIC
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"ISA   ");
    t.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    t.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    entries += 2;
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n on IOAPIC pin n, conforming polarity and trigger; IRQ 0 as ExtINT.
        let kind = if pin == 0 { 3 } else { 0 };
        t.extend_from_slice(&[3, kind, 0, 0, 0, pin, ioapic_id, pin]);
        entries += 1;
    }
    // Local interrupts: ExtINT on every LAPIC's LINT0, NMI on LINT1.
    t.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;
    let len = u16::try_from(t.len()).map_err(|_| MpTableError::TooManyCpus(cpus))?;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);

    let table_addr = u32::try_from(at + 16).map_err(|_| MpTableError::TooManyCpus(cpus))?;
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(b"_MP_");
    f.extend_from_slice(&table_addr.to_le_bytes());
    f.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    f[10] = checksum(&f);
    f.extend_from_slice(&t);
    Ok(f)
}

/// Writes the MP table for `cpus` vCPUs at its place in the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus, layout::MPTABLE)?;
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE))
        .map_err(MpTableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 32] {
            let b = build(cpus, layout::MPTABLE).expect("fits");
            assert!(b.len() <= 1024);
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let t = &b[16..];
            assert_eq!(&t[..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([t[4], t[5]]));
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let procs = (0..usize::from(cpus))
                .filter(|i| t[44 + 20 * i] == 0 && t[44 + 20 * i + 3] & 1 == 1)
                .count();
            assert_eq!(procs, usize::from(cpus));
        }
        assert!(build(33, layout::MPTABLE).is_err());
        assert!(build(0, layout::MPTABLE).is_err());
    }
}

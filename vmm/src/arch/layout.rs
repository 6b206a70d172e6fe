//! Where things live in guest physical memory at boot (x86-64), the conventional layout of
//! Linux's 64-bit boot protocol as Firecracker uses it.

/// GDT.
pub const BOOT_GDT: u64 = 0x500;
/// IDT (empty).
pub const BOOT_IDT: u64 = 0x520;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE: u64 = 0xa000;
/// Four page directories (4 × 512 × 2 MiB pages: the first 4 GiB identity-mapped),
/// 0xb000..0xf000.
pub const PDE: u64 = 0xb000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// MP table.
pub const MPTABLE: u64 = 0x9fc00;
/// Start of the extended BIOS data area (RAM below it is usable).
pub const EBDA: u64 = 0x9fc00;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line.
pub const CMDLINE_MAX: usize = 2048;
/// Where kernels and flat test guests are loaded (1 MiB).
pub const HIMEM: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: RAM above it moves past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Size of that gap.
pub const MMIO_GAP_SIZE: u64 = 0x4000_0000;
/// Where PCI BARs are placed: the bottom of the MMIO gap.
pub const PCI_MMIO_BASE: u64 = MMIO_GAP_START;
/// Interrupt lines given to PCI functions (INTx), in order: free ISA lines.
pub const PCI_IRQS: [u8; 8] = [5, 9, 10, 11, 12, 14, 15, 6];

//! Loading what the VM boots: a Linux kernel (ELF `vmlinux` or `bzImage`, through linux-loader)
//! with its command line, initramfs and zero page, or a flat binary test guest entered in long
//! mode at its first byte.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Why loading failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage, or it does not fit.
    #[error(
        "cannot load kernel {path}: it is neither an x86-64 ELF vmlinux nor a bzImage that fits in guest memory ({elf}; {bz})"
    )]
    Kernel {
        /// File.
        path: String,
        /// ELF loader's reason.
        elf: String,
        /// bzImage loader's reason.
        bz: String,
    },
    /// The command line is too long or invalid.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory: give the VM more memory"
    )]
    Initrd {
        /// File.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Writing into guest memory failed.
    #[error("writing {0} into guest memory: {1}")]
    Memory(&'static str, String),
}

/// A loaded kernel.
pub struct Loaded {
    /// 64-bit entry point.
    pub entry: u64,
    /// The bzImage's setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Loads an ELF `vmlinux` or a `bzImage` at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Loaded, BootError> {
    let high = Some(GuestAddress(layout::HIMEM));
    let elf = match Elf::load(mem, None, &mut open(path)?, high) {
        Ok(r) => {
            return Ok(Loaded {
                entry: r.kernel_load.raw_value(),
                setup_header: None,
            });
        }
        Err(e) => e.to_string(),
    };
    match BzImage::load(mem, None, &mut open(path)?, high) {
        // The 64-bit entry point of a bzImage is 0x200 past where it is loaded.
        Ok(r) => Ok(Loaded {
            entry: r.kernel_load.raw_value() + 0x200,
            setup_header: r.setup_header,
        }),
        Err(bz) => Err(BootError::Kernel {
            path: path.display().to_string(),
            elf,
            bz: bz.to_string(),
        }),
    }
}

/// Writes the command line, the initramfs (at the top of low memory) and the zero page.
pub fn configure_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &str,
    loaded: &Loaded,
    initrd: Option<&Path>,
) -> Result<(), BootError> {
    let mut cl =
        Cmdline::new(layout::CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cl)
        .map_err(|e| BootError::Memory("command line", e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(h) = loaded.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = (cmdline.len() + 1) as u32;
    params.hdr.kernel_alignment = 0x0100_0000;

    let low_end = mem_size.min(layout::MMIO_GAP_START);
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|source| BootError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let size = data.len() as u64;
        let addr = low_end
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a > layout::HIMEM + 16 * 1024 * 1024)
            .ok_or_else(|| BootError::Initrd {
                path: path.display().to_string(),
                size,
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| BootError::Memory("initramfs", e.to_string()))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = Vec::new();
    e820.push((0, layout::EBDA));
    e820.push((layout::HIMEM, low_end - layout::HIMEM));
    if mem_size > layout::MMIO_GAP_START {
        e820.push((
            layout::MMIO_GAP_START + layout::MMIO_GAP_SIZE,
            mem_size - layout::MMIO_GAP_START,
        ));
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: 1,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(|e| BootError::Memory("zero page", e.to_string()))
}

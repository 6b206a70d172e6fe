//! boxd's virtual machine monitor: one process per VM (`boxd vmm`), built on the rust-vmm
//! crates (kvm-ioctls, vm-memory, linux-loader, vm-superio, vmm-sys-util), plus the host
//! virtualization probe `boxd` uses to choose a runtime. The worker's side (runtimes, images,
//! disks, networking) is boxd-worker (`vmm/worker`). See DESIGN.md.

pub mod api;
pub mod arch;
pub mod config;
pub mod devices;
pub mod host;
pub mod machine;
pub mod process;
pub mod seccomp;
pub mod vstate;

pub use config::VmConfig;
pub use host::{HostReport, Virtualization};
pub use machine::{Ending, Machine, Running};

/// Path of the freestanding test guest built with this crate (for tests and benches).
pub const TEST_GUEST: &str = env!("BOXD_TEST_GUEST");

//! boxd's virtual machine monitor: one process per VM (`boxd vmm`), built on the rust-vmm
//! crates (kvm-ioctls, vm-memory, linux-loader, vm-superio, vmm-sys-util), plus the host
//! virtualization probe `boxd` uses to choose a runtime. See DESIGN.md.

pub mod agent_key;
pub mod api;
pub mod arch;
pub mod config;
pub mod confine;
pub mod devices;
pub mod host;
pub mod image;
pub mod isolation;
pub mod kvm_runtime;
pub mod machine;
pub mod process;
pub mod sandbox;
pub mod seccomp;
pub mod vstate;
pub mod worker;

pub use config::VmConfig;
pub use host::{HostReport, Virtualization};
pub use machine::{Ending, Machine, Running};

/// Path of the freestanding test guest built with this crate (for tests and benches).
pub const TEST_GUEST: &str = env!("BOXD_TEST_GUEST");

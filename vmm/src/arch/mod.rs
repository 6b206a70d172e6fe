//! x86-64 specifics: guest memory layout, boot tables, loading what boots, vCPU registers.

pub mod boot;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;

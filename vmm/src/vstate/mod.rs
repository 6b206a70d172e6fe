//! KVM objects: the VM (memory, irqchip, PIT) and its vCPUs (registers, the run loop).

pub mod vcpu;
pub mod vm;

//! KVM objects: the VM (memory, irqchip, PIT) and its vCPUs (registers, the run loop), and the
//! state the vCPU threads and the API share (`control`).

pub mod control;
pub mod vcpu;
pub mod vm;

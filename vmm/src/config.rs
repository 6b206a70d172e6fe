//! The VM's configuration: the JSON file `boxd vmm --config` reads. Unknown fields are errors,
//! and every value is checked before anything is started.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most vCPUs one VM may have (the MP table and the in-kernel IOAPIC route up to this).
pub const MAX_VCPUS: u8 = 32;
/// Least guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest memory, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// One VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs (1..=32).
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Guest memory in MiB (16..=1048576).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// What to boot.
    pub boot: BootConfig,
    /// File the serial console is appended to (created if missing).
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// virtio-blk disks, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, each on a tap, after the disks in slot order.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// A virtio-vsock device, after the network interfaces.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

/// The vsock device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0-2 are reserved).
    pub guest_cid: u64,
    /// Unix socket the host connects to (`CONNECT <port>\n`); guest connections to host
    /// port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// One virtio-net interface.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap interface to attach to (created if missing, which needs CAP_NET_ADMIN).
    pub tap: String,
    /// MAC address `aa:bb:cc:dd:ee:ff` (default: 52:54:00 + three bytes from the tap name).
    #[serde(default)]
    pub mac: Option<String>,
}

/// One virtio-blk disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file; its size (rounded down to 512 bytes) is the disk's capacity.
    pub path: PathBuf,
    /// Refuse writes (and open the file read-only).
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads as the disk's serial (up to 20 bytes; default `disk<N>`).
    #[serde(default)]
    pub id: Option<String>,
}

/// Most devices of all kinds on the PCI bus.
pub const MAX_DEVICES: usize = 8;

/// The kernel and what goes with it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// An x86-64 ELF `vmlinux` (or any 64-bit ELF, like the test guest) or a `bzImage`.
    pub kernel: PathBuf,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Initramfs (cpio, optionally compressed).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
}

fn one() -> u8 {
    1
}

fn default_memory() -> u64 {
    128
}

/// What is wrong with a config, said so that the fix is clear.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not readable.
    #[error("cannot read VM config {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid JSON for this schema.
    #[error("invalid VM config {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// serde's message, with line and column.
        message: String,
    },
    /// A value is out of range or names a missing file.
    #[error("invalid VM config {path}: `{field}` {problem}")]
    Value {
        /// File.
        path: String,
        /// The field.
        field: &'static str,
        /// What is wrong and what to do.
        problem: String,
    },
}

impl VmConfig {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field, problem: String| ConfigError::Value {
            path: path.display().to_string(),
            field,
            problem,
        };
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(bad(
                "vcpus",
                format!("is {}: use 1 to {MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(bad(
                "memory_mib",
                format!(
                    "is {}: use {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if !self.boot.kernel.is_file() {
            return Err(bad(
                "boot.kernel",
                format!("{} is not a readable file", self.boot.kernel.display()),
            ));
        }
        if let Some(i) = &self.boot.initrd
            && !i.is_file()
        {
            return Err(bad(
                "boot.initrd",
                format!("{} is not a readable file", i.display()),
            ));
        }
        if self.disks.len() + self.net.len() > MAX_DEVICES {
            return Err(bad(
                "disks",
                format!(
                    "and `net` have {} entries together: at most {MAX_DEVICES}",
                    self.disks.len() + self.net.len()
                ),
            ));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(bad(
                    "vsock.guest_cid",
                    format!("is {}: use 3 to 4294967295 (0-2 are reserved)", v.guest_cid),
                ));
            }
            let dir_ok = v
                .uds_path
                .parent()
                .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir());
            if !dir_ok || v.uds_path.as_os_str().len() > 100 {
                return Err(bad(
                    "vsock.uds_path",
                    format!(
                        "{} must be in an existing directory and under 100 bytes long",
                        v.uds_path.display()
                    ),
                ));
            }
        }
        let devices = self.disks.len() + self.net.len() + usize::from(self.vsock.is_some());
        if devices > MAX_DEVICES {
            return Err(bad(
                "disks",
                format!("`net` and `vsock` make {devices} devices: at most {MAX_DEVICES}"),
            ));
        }
        for n in &self.net {
            if n.tap.is_empty() || n.tap.len() > 15 || n.tap.contains(['/', ' ']) {
                return Err(bad(
                    "net[].tap",
                    format!(
                        "`{}` is not an interface name (1-15 bytes, no / or space)",
                        n.tap
                    ),
                ));
            }
            if let Some(m) = &n.mac
                && crate::devices::virtio::net::parse_mac(m).is_none()
            {
                return Err(bad(
                    "net[].mac",
                    format!("`{m}` is not a MAC address: write it as 52:54:00:12:34:56"),
                ));
            }
        }
        for d in &self.disks {
            if !d.path.is_file() {
                return Err(bad(
                    "disks[].path",
                    format!("{} is not a readable file", d.path.display()),
                ));
            }
            if d.id.as_ref().is_some_and(|i| i.len() > 20) {
                return Err(bad("disks[].id", "is longer than 20 bytes".into()));
            }
        }
        if self.boot.cmdline.len() >= crate::arch::layout::CMDLINE_MAX {
            return Err(bad(
                "boot.cmdline",
                format!(
                    "is {} bytes: keep it under {}",
                    self.boot.cmdline.len(),
                    crate::arch::layout::CMDLINE_MAX
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::parse(s, Path::new("vm.json"))
    }

    #[test]
    fn defaults_and_errors_name_the_field() {
        let k = tempfile::NamedTempFile::new().expect("temp");
        let kp = k.path().display().to_string();
        let c = parse(&format!(r#"{{"boot": {{"kernel": "{kp}"}}}}"#)).expect("valid");
        assert_eq!((c.vcpus, c.memory_mib), (1, 128));

        let e = parse(&format!(r#"{{"vcpus": 0, "boot": {{"kernel": "{kp}"}}}}"#));
        assert!(e.expect_err("zero").to_string().contains("`vcpus` is 0"));
        let e = parse(&format!(
            r#"{{"memory_mib": 1, "boot": {{"kernel": "{kp}"}}}}"#
        ));
        assert!(e.expect_err("tiny").to_string().contains("`memory_mib`"));
        let e = parse(r#"{"boot": {"kernel": "/nonexistent/vmlinux"}}"#);
        assert!(e.expect_err("missing").to_string().contains("boot.kernel"));
        let e = parse(&format!(r#"{{"cpus": 2, "boot": {{"kernel": "{kp}"}}}}"#));
        assert!(
            e.expect_err("unknown")
                .to_string()
                .contains("unknown field `cpus`")
        );
        let e = parse("{");
        assert!(e.expect_err("syntax").to_string().contains("line 1"));
    }
}

//! The node's identity file, `<data-dir>/node.json` (mode 0600): who this node is in which
//! cluster, and the key for internal RPCs. Written once, after founding or joining succeeded;
//! its presence is what makes a later start a resume.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use boxd_controlplane::model::NodeId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A node's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Self-chosen stable identity.
    pub uuid: Uuid,
    /// Raft id assigned by the cluster.
    pub node_id: NodeId,
    /// Cluster it belongs to.
    pub cluster_id: Uuid,
    /// Key for internal RPCs.
    pub peer_key: String,
    /// The cluster secret, kept by the founding node only (to re-found after a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("node.json")
}

impl Identity {
    /// Reads the identity, if this data directory has one.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, String> {
        let p = path(data_dir);
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is damaged ({e}): restore it from a backup, or remove the data directory to start over", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    }

    /// Writes the identity atomically with mode 0600.
    pub fn store(&self, data_dir: &Path) -> std::io::Result<()> {
        let tmp = data_dir.join("node.json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path(data_dir))?;
        std::fs::File::open(data_dir)?.sync_all()
    }
}

//! Commands about images: which images each node holds (so a worker that lacks one can fetch
//! it from a peer).

#[allow(clippy::wildcard_imports)]
use super::*;

use crate::model::ImageAd;

/// `PublishImages`: a node says which images it holds (replacing what it said before), so a worker
/// that lacks one can fetch it from a peer.
pub(super) fn publish_images(
    c: &Connection,
    node: &NodeId,
    images: &Vec<ImageAd>,
) -> Result<Outcome, Fail> {
    if rows::node(c, *node)?.is_none() {
        return Err(not_found("node", node));
    }
    if images.len() > MAX_IMAGES {
        return Err(invalid(
            "images",
            format!("at most {MAX_IMAGES} per node; remove some"),
        ));
    }
    for i in images {
        if !is_dns_label(&i.name) {
            return Err(invalid(
                format!("image name {:?}", i.name),
                "use lowercase letters, digits and '-'",
            ));
        }
        if i.digest.len() != 64 || !i.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                format!("digest of image {}", i.name),
                "a SHA-256 in hex (64 digits)",
            ));
        }
    }
    exec(
        c,
        "DELETE FROM node_images WHERE node = ?1",
        params![sql_u64(*node)],
    )?;
    for i in images {
        exec(
            c,
            "INSERT OR REPLACE INTO node_images (node, name, digest, bytes, built_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                sql_u64(*node),
                i.name,
                i.digest,
                sql_u64(i.bytes),
                sql_u64(i.built_at)
            ],
        )?;
    }
    Ok(Outcome::Done)
}

//! Commands on the cluster as a whole: its founding settings, SSH host key, local CA, TXT records.

#[allow(clippy::wildcard_imports)]
use super::*;
use ipnet::Ipv4Net;
use uuid::Uuid;

use crate::model::{Millis, TlsMaterial};

/// `InitCluster`: fixes the cluster settings.
#[allow(clippy::too_many_arguments)] // the command's fields, as the dispatch takes them apart
pub(super) fn init_cluster(
    c: &Connection,
    t: &mut Touched,
    cluster_id: &Uuid,
    secret: &String,
    zone: &String,
    lobby: &Ipv4Addr,
    public_pool: &Ipv4Net,
    max_vms_per_account: &u32,
    at: &Millis,
) -> Result<Outcome, Fail> {
    if let Some(existing) = rows::settings(c)? {
        return if existing.cluster_id == *cluster_id {
            Ok(Outcome::Done)
        } else {
            Err(ApplyError::AlreadyInitialized {
                existing: existing.cluster_id,
            }
            .into())
        };
    }
    if let Some(p) = zone_problem(zone) {
        return Err(invalid(format!("zone `{zone}`"), p));
    }
    if secret.len() < 32 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("cluster secret", "expected at least 32 hex digits"));
    }
    exec(
        c,
        "INSERT INTO cluster (one, cluster_id, secret, zone, lobby, public_pool,
             max_vms_per_account, created_at)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            cluster_id.to_string(),
            secret,
            zone,
            lobby.to_string(),
            public_pool.to_string(),
            max_vms_per_account,
            sql_u64(*at)
        ],
    )?;
    t.settings = true;
    Ok(Outcome::Done)
}

/// `SetSshHostKey`: stores the SSH host key every proxy presents (OpenSSH private key PEM).
pub(super) fn set_ssh_host_key(c: &Connection, private_key: &str) -> Result<Outcome, Fail> {
    if private_key.len() > 16 * 1024
        || !private_key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
    {
        return Err(invalid(
            "SSH host key",
            "expected an OpenSSH private key of at most 16 KiB",
        ));
    }
    if rows::meta(c, rows::SSH_HOST_KEY)?.is_none() {
        rows::set_meta(c, rows::SSH_HOST_KEY, private_key)?;
    }
    Ok(Outcome::Done)
}

/// `SetTlsLocalCa`: stores the cluster's local CA and zone certificate.
pub(super) fn set_tls_local_ca(c: &Connection, material: &TlsMaterial) -> Result<Outcome, Fail> {
    let pem = |s: &str| s.len() <= 64 * 1024 && s.contains("-----BEGIN ");
    if !(pem(&material.ca_cert) && pem(&material.chain) && pem(&material.key)) {
        return Err(invalid(
            "TLS material",
            "expected PEM certificates and key of at most 64 KiB each",
        ));
    }
    if rows::meta(c, rows::TLS_LOCAL_CA)?.is_none() {
        let json =
            serde_json::to_string(material).map_err(|e| invalid("TLS material", e.to_string()))?;
        rows::set_meta(c, rows::TLS_LOCAL_CA, &json)?;
    }
    Ok(Outcome::Done)
}

/// `SetTxt`: publishes TXT records at `name` in the zone (ACME challenges and the like).
pub(super) fn set_txt(
    c: &Connection,
    t: &mut Touched,
    cache: &mut Cache,
    name: &String,
    values: &Vec<String>,
) -> Result<Outcome, Fail> {
    settings(c, &mut cache.settings)?;
    if let Some(p) = txt_owner_problem(name) {
        return Err(invalid(format!("TXT owner `{name}`"), p));
    }
    if values.len() > 16 {
        return Err(invalid("TXT values", "at most 16 records per name"));
    }
    if let Some(v) = values.iter().find(|v| v.len() > 255) {
        return Err(invalid(
            format!("TXT value of {} bytes", v.len()),
            "a TXT string holds at most 255 bytes",
        ));
    }
    if values.is_empty() {
        exec(c, "DELETE FROM dns_txt WHERE name = ?1", params![name])?;
    } else {
        let vals =
            serde_json::to_string(values).map_err(|e| invalid("TXT values", e.to_string()))?;
        exec(
            c,
            "INSERT INTO dns_txt (name, vals) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET vals = excluded.vals",
            params![name, vals],
        )?;
    }
    t.txt.insert(name.clone());
    Ok(Outcome::Done)
}

fn zone_problem(zone: &str) -> Option<&'static str> {
    if zone.is_empty() || zone.len() > 200 {
        Some("a zone has 1 to 200 characters")
    } else if !zone.split('.').all(is_dns_label) {
        Some("use dot-separated labels of lowercase letters, digits and '-'")
    } else {
        None
    }
}

/// Why `name` cannot own TXT records: dot-separated labels of lowercase letters, digits, '-' and
/// '_' (for `_acme-challenge`), relative to the zone; empty means the apex.
fn txt_owner_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return None;
    }
    if name.len() > 200 {
        return Some("a name has at most 200 characters");
    }
    let ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    });
    if ok {
        None
    } else {
        Some("use dot-separated labels of lowercase letters, digits, '-' and '_'")
    }
}

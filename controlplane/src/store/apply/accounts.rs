//! Commands about accounts and what proves them: SSH keys, registrations, the owner (API
//! tokens: `tokens.rs`).

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::model::Millis;

/// `CreateAccount`: creates an account.
pub(super) fn create_account(
    c: &Connection,
    cache: &mut Cache,
    id: &AccountId,
    name: &String,
    max_vms: &Option<u32>,
    at: &Millis,
) -> Result<Outcome, Fail> {
    let s = settings(c, &mut cache.settings)?;
    if let Some(existing) = rows::account(c, *id)? {
        return if existing.name == *name {
            Ok(Outcome::Done)
        } else {
            Err(ApplyError::IdConflict {
                what: "account".into(),
                id: id.to_string(),
            }
            .into())
        };
    }
    if let Some(p) = text_problem(name, 128) {
        return Err(invalid(format!("account name `{name}`"), p));
    }
    let taken: bool = one(
        c,
        "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = ?1)",
        params![name],
        |r| r.get(0),
    )?;
    if taken {
        return Err(ApplyError::AccountNameTaken { name: name.clone() }.into());
    }
    exec(
        c,
        "INSERT INTO accounts (id, name, max_vms, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            id.to_string(),
            name,
            max_vms.unwrap_or(s.max_vms_per_account),
            sql_u64(*at)
        ],
    )?;
    Ok(Outcome::Done)
}

/// `AddSshKey`: binds an SSH key to an account.
pub(super) fn add_ssh_key(
    c: &Connection,
    t: &mut Touched,
    cache: &mut Cache,
    account: &AccountId,
    fingerprint: &Fingerprint,
    public_key: &str,
    at: &Millis,
) -> Result<Outcome, Fail> {
    settings(c, &mut cache.settings)?;
    if rows::account(c, *account)?.is_none() {
        return Err(not_found("account", account));
    }
    if let Some(p) = text_problem(public_key, 16 * 1024) {
        return Err(invalid("public key", p));
    }
    match rows::key_owner(c, fingerprint)? {
        Some(owner) if owner == *account => return Ok(Outcome::Done),
        Some(_) => {
            return Err(ApplyError::KeyTaken {
                fingerprint: fingerprint.clone(),
            }
            .into());
        }
        None => {}
    }
    insert_key(c, fingerprint, *account, public_key, *at)?;
    t.keys.insert(fingerprint.clone());
    Ok(Outcome::Done)
}

/// `RemoveSshKey`: unbinds a key; an account keeps at least one key.
pub(super) fn remove_ssh_key(
    c: &Connection,
    t: &mut Touched,
    account: &AccountId,
    fingerprint: &Fingerprint,
) -> Result<Outcome, Fail> {
    match rows::key_owner(c, fingerprint)? {
        Some(owner) if owner == *account => {}
        Some(_) => {
            return Err(ApplyError::NotYours {
                what: "key".into(),
                id: fingerprint.to_string(),
            }
            .into());
        }
        None => return Err(not_found("key", fingerprint)),
    }
    let count: i64 = one(
        c,
        "SELECT COUNT(*) FROM ssh_keys WHERE account = ?1",
        params![account.to_string()],
        |r| r.get(0),
    )?;
    if count <= 1 {
        return Err(ApplyError::LastKey.into());
    }
    exec(
        c,
        "DELETE FROM ssh_keys WHERE fingerprint = ?1",
        params![fingerprint.as_str()],
    )?;
    t.keys.insert(fingerprint.clone());
    Ok(Outcome::Done)
}

/// `CreateRegistration`: parks an unknown key until its owner logs in through the web.
pub(super) fn create_registration(
    c: &Connection,
    cache: &mut Cache,
    code: &String,
    fingerprint: &Fingerprint,
    public_key: &String,
    at: &Millis,
    expires_at: &Millis,
) -> Result<Outcome, Fail> {
    settings(c, &mut cache.settings)?;
    if !(8..=64).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(
            "registration code",
            "expected 8 to 64 letters or digits",
        ));
    }
    if let Some(p) = text_problem(public_key, 16 * 1024) {
        return Err(invalid("public key", p));
    }
    let existing: Option<String> = c
        .query_row(
            "SELECT fingerprint FROM registrations WHERE code = ?1",
            params![code],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(ignore_no_rows)?;
    if let Some(fp) = existing {
        return if fp == fingerprint.as_str() {
            Ok(Outcome::Done)
        } else {
            Err(ApplyError::IdConflict {
                what: "registration".into(),
                id: code.clone(),
            }
            .into())
        };
    }
    if rows::key_owner(c, fingerprint)?.is_some() {
        return Err(ApplyError::KeyTaken {
            fingerprint: fingerprint.clone(),
        }
        .into());
    }
    // Any stranger's key causes one of these: expired links go, and past the bound
    // the oldest live ones make room (deterministic: by the proposal's own time).
    exec(
        c,
        "DELETE FROM registrations WHERE expires_at < ?1",
        params![sql_u64(*at)],
    )?;
    exec(
        c,
        "DELETE FROM registrations WHERE code IN (SELECT code FROM registrations
         ORDER BY expires_at, code LIMIT max(0, (SELECT count(*) FROM registrations) - ?1))",
        params![MAX_REGISTRATIONS - 1],
    )?;
    exec(
        c,
        "INSERT INTO registrations (code, fingerprint, public_key, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            code,
            fingerprint.as_str(),
            public_key,
            sql_u64(*at),
            sql_u64(*expires_at)
        ],
    )?;
    Ok(Outcome::Done)
}

/// `CompleteRegistration`: links a parked key to an account and deletes the registration.
pub(super) fn complete_registration(
    c: &Connection,
    t: &mut Touched,
    code: &String,
    account: &AccountId,
    at: &Millis,
) -> Result<Outcome, Fail> {
    let reg: Option<(String, String, i64)> = c
        .query_row(
            "SELECT fingerprint, public_key, expires_at FROM registrations WHERE code = ?1",
            params![code],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map(Some)
        .or_else(ignore_no_rows)?;
    let Some((fp, public_key, expires_at)) = reg else {
        return Err(not_found("registration", code));
    };
    if sql_u64(*at) > expires_at {
        return Err(ApplyError::Expired { code: code.clone() }.into());
    }
    if rows::account(c, *account)?.is_none() {
        return Err(not_found("account", account));
    }
    let fp: Fingerprint = fp
        .parse()
        .map_err(|e: crate::model::ModelError| invalid("stored fingerprint", e.to_string()))?;
    if rows::key_owner(c, &fp)?.is_some() {
        return Err(ApplyError::KeyTaken { fingerprint: fp }.into());
    }
    insert_key(c, &fp, *account, &public_key, *at)?;
    exec(
        c,
        "DELETE FROM registrations WHERE code = ?1",
        params![code],
    )?;
    t.keys.insert(fp);
    Ok(Outcome::Done)
}

/// `ClaimOwner`: on a cluster without accounts, creates the owner account with its first key;
/// refused once any account exists (the first key ever seen on a fresh cluster owns it).
#[allow(clippy::too_many_arguments)] // the command's fields, as the dispatch takes them apart
pub(super) fn claim_owner(
    c: &Connection,
    t: &mut Touched,
    cache: &mut Cache,
    id: &AccountId,
    name: &str,
    fingerprint: &Fingerprint,
    public_key: &str,
    at: &Millis,
) -> Result<Outcome, Fail> {
    let mine = rows::key_owner(c, fingerprint)? == Some(*id);
    if mine {
        return Ok(Outcome::Done);
    }
    let any: bool = one(c, "SELECT EXISTS (SELECT 1 FROM accounts)", [], |r| {
        r.get(0)
    })?;
    if any {
        return Err(ApplyError::OwnerClaimed.into());
    }
    let create = Command::CreateAccount {
        id: *id,
        name: name.to_owned(),
        max_vms: None,
        at: *at,
    };
    apply_one(c, &create, t, cache)?;
    exec(
        c,
        "UPDATE accounts SET owner = 1 WHERE id = ?1",
        params![id.to_string()],
    )?;
    let key = Command::AddSshKey {
        account: *id,
        fingerprint: fingerprint.clone(),
        public_key: public_key.to_owned(),
        at: *at,
    };
    apply_one(c, &key, t, cache)
}

fn insert_key(
    c: &Connection,
    fp: &Fingerprint,
    account: crate::model::AccountId,
    public_key: &str,
    at: u64,
) -> rusqlite::Result<()> {
    exec(
        c,
        "INSERT INTO ssh_keys (fingerprint, account, public_key, added_at) VALUES (?1, ?2, ?3, ?4)",
        params![fp.as_str(), account.to_string(), public_key, sql_u64(at)],
    )?;
    Ok(())
}

/// Who signed in, as `LinkIdentity` names them.
pub(super) struct Identity<'a> {
    pub issuer: &'a str,
    pub subject: &'a str,
    pub email: Option<&'a str>,
}

/// `LinkIdentity`: the key behind `code` joins the account `who` is linked to, or a new one
/// (`account`, named `name` or `name-<code's first 6>` when that is taken) that `who` is then
/// linked to.
#[allow(clippy::too_many_arguments)] // the command's fields, as the dispatch takes them apart
pub(super) fn link_identity(
    c: &Connection,
    t: &mut Touched,
    cache: &mut Cache,
    code: &String,
    who: &Identity<'_>,
    account: &AccountId,
    name: &str,
    at: &Millis,
) -> Result<Outcome, Fail> {
    for (what, v, max) in [("issuer", who.issuer, 512), ("subject", who.subject, 255)] {
        if let Some(p) = text_problem(v, max) {
            return Err(invalid(what, p));
        }
    }
    if let Some(p) = who.email.and_then(|e| text_problem(e, 254)) {
        return Err(invalid("email", p));
    }
    let linked: Option<String> = c
        .query_row(
            "SELECT account FROM identities WHERE issuer = ?1 AND subject = ?2",
            params![who.issuer, who.subject],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(ignore_no_rows)?;
    let to = match linked {
        Some(a) => a
            .parse::<AccountId>()
            .map_err(|e| invalid("stored identity account", e.to_string()))?,
        None => {
            let taken: bool = one(
                c,
                "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = ?1)",
                params![name],
                |r| r.get(0),
            )?;
            let name = if taken {
                format!("{name}-{}", code.get(..6).unwrap_or(code))
            } else {
                name.to_owned()
            };
            // A refusal below (say, the code was used) undoes it: the command's savepoint.
            create_account(c, cache, account, &name, &None, at)?;
            exec(
                c,
                "INSERT INTO identities (issuer, subject, account, email, linked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    who.issuer,
                    who.subject,
                    account.to_string(),
                    who.email,
                    sql_u64(*at)
                ],
            )?;
            *account
        }
    };
    complete_registration(c, t, code, &to, at)
}

//! The zone's own site, at `https://<zone>/`: the front page and the registration pages an
//! unknown SSH key is sent to (`/register/<code>`: which key, until when, and how it gets
//! linked); and the API's host `https://api.<zone>/`, whose JSON Web Key Set
//! (`/.well-known/jwks.json`) lets anyone check a token's signature. Read-only pages: GET and
//! HEAD. Every value shown is escaped; none needs JavaScript.

use boxd_operations::{ErrorKind, PendingKey};

use super::pages::{self, escape};
use super::shard::Shard;
use super::signin;

/// The answer to `method target` (with the request's `Cookie` header, empty when none) for
/// the zone's own name: a complete HTTP/1.1 response.
pub(super) async fn answer(shard: &Shard, method: &str, target: &str, cookies: &str) -> Vec<u8> {
    let head = method == "HEAD";
    if !head && method != "GET" {
        return not_allowed();
    }
    let path = path_of(target);
    let page = match path {
        "/" => pages::apex(&zone(shard), shard.cfg().ssh_port),
        "/register/callback" => {
            let query = target.split_once('?').map_or("", |(_, q)| q);
            let query = query.split('#').next().unwrap_or("");
            signin::callback(shard, query, cookies).await
        }
        _ => match path.strip_prefix("/register/") {
            Some(rest) => match rest.strip_suffix("/login") {
                Some(code) => signin::login(shard, code).await,
                None => register(shard, rest).await,
            },
            None => pages::response(
                404,
                "Not Found",
                "No such page",
                &format!(
                    "{} has no page {path}. Registration links look like https://{}/register/CODE.",
                    zone(shard),
                    zone(shard)
                ),
            ),
        },
    };
    if head { head_only(page) } else { page }
}

/// The answer to `method target` for `api.<zone>` over HTTP/1.1 (or HTTP/2 without gRPC).
pub(super) fn api(shard: &Shard, method: &str, target: &str) -> Vec<u8> {
    let head = method == "HEAD";
    if !head && method != "GET" {
        return not_allowed();
    }
    let zone = zone(shard);
    let page = match path_of(target) {
        "/.well-known/jwks.json" => {
            let keys = boxd_model::tokens::jwks(shard.view().current().token_keys());
            pages::json(200, "OK", &keys.to_string())
        }
        "/" => pages::response(
            200,
            "OK",
            &format!("The {zone} API"),
            &format!(
                "A gRPC API (boxd.api.v1, HTTP/2) for the operations of the lobby. Make a \
                 token with `{} token create` and send it as `authorization: Bearer <token>`. \
                 The keys that sign tokens are at https://api.{zone}/.well-known/jwks.json.",
                shard.ops().zone_ssh()
            ),
        ),
        path => pages::response(
            404,
            "Not Found",
            "No such page",
            &format!("api.{zone} has no page {path}."),
        ),
    };
    if head { head_only(page) } else { page }
}

fn not_allowed() -> Vec<u8> {
    with_header(
        pages::response(
            405,
            "Method Not Allowed",
            "Method not allowed",
            "These pages are only read (GET).",
        ),
        "Allow: GET, HEAD",
    )
}

/// A request target's path (no query or fragment).
fn path_of(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or("")
}

fn zone(shard: &Shard) -> String {
    shard.ops().zone()
}

/// `/register/<code>`: the key waiting behind the code and how it gets linked.
async fn register(shard: &Shard, code: &str) -> Vec<u8> {
    let ops = shard.ops();
    let lobby = shard.ops().zone_ssh();
    match ops.pending_key(code).await {
        Ok(k) if k.expired => pages::response(
            410,
            "Gone",
            "This link has expired",
            &format!(
                "Registration links work for 24 hours. Connect again with `{lobby}` for a new one."
            ),
        ),
        Ok(k) => {
            let how = match shard.sign_in.as_ref() {
                Some(s) => signin::button(s, &k.code, &lobby),
                None => approval(&k.code, &lobby),
            };
            pages::document(
                200,
                "OK",
                &format!("Link this key to {}", ops.zone()),
                &(pending(&k, &lobby) + &how),
            )
        }
        Err(e) if e.kind == ErrorKind::NotFound => pages::response(
            404,
            "Not Found",
            "No such registration link",
            &format!(
                "This link was already used, replaced by a newer one, or mistyped. Connect \
                 again with `{lobby}`: a registered key gets in, an unknown one gets a new link."
            ),
        ),
        Err(e) => pages::response(
            503,
            "Service Unavailable",
            "Try again in a moment",
            &e.message,
        ),
    }
}

/// The first part of a registration page: the key.
fn pending(k: &PendingKey, lobby: &str) -> String {
    let expires = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(k.expires_at),
    );
    format!(
        "<p>An SSH key asked to join this cluster. Once it is linked to an account, it logs in \
         to the lobby (<code>{lobby}</code>), where its VMs are made, and to those VMs.</p>\n\
         <div class=\"box\"><dl>\n<dt>Key type</dt><dd><code>{kind}</code></dd>\n\
         <dt>Fingerprint</dt><dd><code>{fp}</code></dd>\n\
         <dt>Link valid until</dt><dd>{expires}</dd>\n</dl></div>\n\
         <p>Check the fingerprint against yours: <code>ssh-keygen -lf ~/.ssh/id_ed25519.pub</code>.</p>\n",
        lobby = escape(lobby),
        kind = escape(&k.key_type),
        fp = escape(k.fingerprint.as_str()),
    )
}

/// The second part of a registration page without a sign-in provider: the owner approves.
fn approval(code: &str, lobby: &str) -> String {
    format!(
        "<h2>How it gets linked</h2>\n\
         <p>This cluster has no sign-in provider, so its owner approves new keys. Send them this \
         code:</p>\n<div class=\"box\"><code>{code}</code></div>\n\
         <p>They run <code>{lobby} approve {code}</code> (a new account) or add \
         <code>--to-account=NAME</code> to join an existing one. Then reconnect with \
         <code>{lobby}</code>.</p>\n\
         <p class=\"muted\">Already have a registered key? Add this one from it instead: \
         <code>{lobby} keys add &lt; key.pub</code>.</p>",
        lobby = escape(lobby),
        code = escape(code),
    )
}

/// `page` with one more header field (`Name: value`) after its status line.
fn with_header(page: Vec<u8>, field: &str) -> Vec<u8> {
    let Some(eol) = page.windows(2).position(|w| w == b"\r\n") else {
        return page;
    };
    let mut out = Vec::with_capacity(page.len() + field.len() + 2);
    out.extend_from_slice(&page[..eol + 2]);
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&page[eol + 2..]);
    out
}

/// `page` without its body (a HEAD answer keeps the length of the GET's).
fn head_only(mut page: Vec<u8>) -> Vec<u8> {
    if let Some(end) = page.windows(4).position(|w| w == b"\r\n\r\n") {
        page.truncate(end + 4);
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_and_head_answers() {
        let p = with_header(
            pages::response(405, "Method Not Allowed", "t", "d"),
            "Allow: GET",
        );
        let s = String::from_utf8(p.clone()).expect("utf8");
        assert!(
            s.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n"),
            "{s}"
        );
        let h = head_only(p);
        assert!(h.ends_with(b"\r\n\r\n") && !h.windows(5).any(|w| w == b"<html"));
    }

    #[test]
    fn a_pending_key_is_shown_escaped() {
        let k = PendingKey {
            code: "0123456789abcdef0123456789abcdef".into(),
            key_type: "<script>".into(),
            fingerprint: "SHA256:ZQRBpHM/+AqtWckq+X1GA9+jPj/NX2bCQWauY5oyBRw"
                .parse()
                .expect("fp"),
            created_at: 0,
            expires_at: 86_400_000,
            expired: false,
        };
        let body =
            pending(&k, "ssh -p 2222 boxd.test") + &approval(&k.code, "ssh -p 2222 boxd.test");
        assert!(body.contains("&lt;script&gt;") && !body.contains("<script>"));
        assert!(body.contains("ssh -p 2222 boxd.test approve 0123456789abcdef0123456789abcdef"));
        assert!(body.contains("Fri, 02 Jan 1970 00:00:00 GMT"));
    }
}

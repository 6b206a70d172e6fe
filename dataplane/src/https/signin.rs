//! The sign-in pages of the zone's site, when an OpenID provider is configured
//! (boxd-oidc does the protocol): `/register/<code>/login` redirects to the provider with a
//! cookie that binds the sign-in to this browser; `/register/callback` is where the provider
//! sends the browser back, and says what was linked or why nothing was.

use boxd_oidc::{Failure, SignIn};

use super::pages::{self, escape};
use super::shard::Shard;

/// `/register/<code>/login`.
pub(super) async fn login(shard: &Shard, code: &str) -> Vec<u8> {
    let Some(sign_in) = shard.sign_in.as_ref() else {
        return no_provider(shard);
    };
    match sign_in.start(code).await {
        Ok(start) => redirect(&start.location, &start.cookie),
        Err(f) => failure(&f),
    }
}

/// `/register/callback?<query>`.
pub(super) async fn callback(shard: &Shard, query: &str, cookies: &str) -> Vec<u8> {
    let Some(sign_in) = shard.sign_in.as_ref() else {
        return no_provider(shard);
    };
    let lobby = shard.ops().zone_ssh();
    match sign_in.finish(query, cookies).await {
        Ok(linked) => {
            let a = &linked.approved;
            let account = if a.new_account {
                format!("a new account, <code>{}</code>", escape(&a.account))
            } else {
                format!("your account <code>{}</code>", escape(&a.account))
            };
            let email = linked
                .email
                .as_deref()
                .map(|e| format!(" as {}", escape(e)))
                .unwrap_or_default();
            pages::document(
                200,
                "OK",
                "Linked: reconnect with ssh",
                &format!(
                    "<p>You signed in{email}. The key <code>{fp}</code> is linked to \
                     {account}.</p>\n<div class=\"box\"><code>{lobby}</code></div>\n\
                     <p>Reconnect with it: you are in.</p>",
                    fp = escape(a.fingerprint.as_str()),
                    lobby = escape(&lobby),
                ),
            )
        }
        Err(f) => failure(&f),
    }
}

/// The sign-in part of a registration page: a button (a link: the pages run no script).
pub(super) fn button(sign_in: &SignIn, code: &str, lobby: &str) -> String {
    format!(
        "<h2>How it gets linked</h2>\n<p>Sign in, and this key joins your account (a new one \
         the first time you sign in here).</p>\n\
         <p><a class=\"button\" href=\"/register/{code}/login\">Sign in with {name}</a></p>\n\
         <p class=\"muted\">Sign in only if your own ssh client just gave you this link: the \
         key joins the account you sign in to, with all its VMs.</p>\n\
         <p class=\"muted\">Then reconnect with <code>{lobby}</code>. Already have a registered \
         key? Add this one from it instead: <code>{lobby} keys add &lt; key.pub</code>.</p>",
        code = escape(code),
        name = escape(&sign_in.name()),
        lobby = escape(lobby),
    )
}

fn no_provider(shard: &Shard) -> Vec<u8> {
    pages::response(
        404,
        "Not Found",
        "No sign-in here",
        &format!(
            "{} has no sign-in provider: its owner approves new keys. Open your registration \
             link for how.",
            shard.ops().zone()
        ),
    )
}

fn failure(f: &Failure) -> Vec<u8> {
    pages::response(f.status, reason(f.status), &f.title, &f.detail)
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A 303 to `location` that sets `cookie`.
fn redirect(location: &str, cookie: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 303 See Other\r\nLocation: {location}\r\nSet-Cookie: {cookie}\r\n\
         Content-Length: 0\r\nConnection: close\r\nCache-Control: no-store\r\n\
         Referrer-Policy: no-referrer\r\n\r\n"
    )
    .into_bytes()
}

//! The friendly failure pages: what a browser shows when the name is unknown, the VM is
//! stopped or not answering.

/// The one stylesheet every page carries (inline: pages need no second request and no
/// JavaScript).
const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;\
padding:0 1em;color:#1d2430;background:#fbfbfd}h1{font-size:1.6em;margin:0 0 .6em}\
code,kbd{font:.95em ui-monospace,monospace;background:#eef0f5;padding:.1em .35em;\
border-radius:4px}dl{display:grid;grid-template-columns:max-content auto;gap:.3em 1em}\
dt{color:#5a6478}dd{margin:0;word-break:break-all}.box{background:#fff;border:1px solid \
#dde1ea;border-radius:10px;padding:1.2em 1.5em;margin:1.5em 0}.muted,footer{color:#6b7487;\
font-size:.9em}footer{margin-top:3em}h2{font-size:1.15em;margin-top:1.8em}.button{display:\
inline-block;background:#2b59c3;color:#fff;text-decoration:none;padding:.6em 1.3em;\
border-radius:8px;font-weight:600}";

/// A complete HTTP/1.1 response with an HTML page: `title` (text, escaped here) and `body`
/// (HTML the caller built, escaping what it got from anyone); the connection closes after it.
pub fn document(status: u16, reason: &str, title: &str, body: &str) -> Vec<u8> {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title}</title><style>{STYLE}</style></head>\n<body>\n<h1>{title}</h1>\n\
         {body}\n<footer>boxd</footer>\n</body></html>\n",
        title = escape(title),
    );
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\
         X-Frame-Options: DENY\r\nContent-Security-Policy: default-src 'none'; \
         style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'\r\n\
         Referrer-Policy: no-referrer\r\n\r\n",
        html.len()
    )
    .into_bytes();
    r.extend_from_slice(html.as_bytes());
    r
}

/// A complete HTTP/1.1 response with a JSON body; cached for a minute (a rotated key is
/// published within that).
pub fn json(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\nCache-Control: max-age=60\r\n\
         Access-Control-Allow-Origin: *\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// A page with one paragraph of text (escaped here).
pub fn response(status: u16, reason: &str, title: &str, detail: &str) -> Vec<u8> {
    document(status, reason, title, &format!("<p>{}</p>", escape(detail)))
}

/// No VM by that name.
pub fn not_found(host: &str, zone: &str) -> Vec<u8> {
    response(
        404,
        "Not Found",
        "No such VM",
        &format!(
            "There is no VM called \u{201c}{}\u{201d} in {zone}. VM addresses look like \
             https://<name>.{zone}/ — list yours with `ssh {zone} ls`.",
            host.split('.').next().unwrap_or(host)
        ),
    )
}

/// The zone's own name (`https://<zone>/`): a page about this cluster and how to start.
/// `ssh_port` is the lobby's SSH port (shown when it is not 22).
pub fn apex(zone: &str, ssh_port: u16) -> Vec<u8> {
    let ssh = match ssh_port {
        22 => "ssh".to_owned(),
        p => format!("ssh -p {p}"),
    };
    response(
        200,
        "OK",
        &format!("{zone} \u{2014} a boxd cluster"),
        &format!(
            "Real VMs, made and reached over SSH. Create one with `{ssh} {zone} new \
             --name=myapp`; then `{ssh} myapp.{zone}` lands in its root shell and \
             https://myapp.{zone}/ reaches its port 80. Your SSH key is your identity: the \
             first time it connects you are told how to link it to an account. `{ssh} {zone} \
             help` lists the commands."
        ),
    )
}

/// A name outside this cluster's zone: nothing here can answer for it (RFC 9110 15.5.20).
pub fn not_served(host: &str, zone: &str) -> Vec<u8> {
    response(
        421,
        "Misdirected Request",
        "Not served here",
        &format!(
            "This server answers only for {zone} and names in it (https://<name>.{zone}/); \
             {host} is not one of them. Check the name, or the DNS record that sent you here."
        ),
    )
}

/// The VM exists but is stopped (or not wired yet).
pub fn unavailable(name: &str, zone: &str, stopped: bool) -> Vec<u8> {
    let detail = if stopped {
        format!("The VM {name} is stopped. Start it with `ssh {zone} start {name}`.")
    } else {
        format!("The VM {name} is starting; try again in a moment.")
    };
    response(503, "Service Unavailable", "VM not running", &detail)
}

/// The VM did not accept the connection.
pub fn bad_gateway(name: &str, port: u16) -> Vec<u8> {
    response(
        502,
        "Bad Gateway",
        "VM not answering",
        &format!(
            "The VM {name} is running but nothing answered on its port {port}. Start a web \
             server in the VM listening on port {port}."
        ),
    )
}

/// The VM's worker has gone silent (`why`: which and for how long).
pub fn worker_down(name: &str, why: &str) -> Vec<u8> {
    response(
        503,
        "Service Unavailable",
        "VM unreachable",
        &format!(
            "The VM {name} cannot be reached: its {why}. It comes back with its worker; try              again later."
        ),
    )
}

/// The Host header names another VM than the TLS connection was opened for.
pub fn misdirected(sni: &str) -> Vec<u8> {
    response(
        421,
        "Misdirected Request",
        "Wrong connection",
        &format!("This connection is for {sni}; open a new one for another name."),
    )
}

/// The request could not be read.
pub fn bad_request(why: &str) -> Vec<u8> {
    response(400, "Bad Request", "Bad request", why)
}

/// `s` safe inside HTML text and attribute values.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_complete_responses() {
        let r = String::from_utf8(not_found("nope.boxd.test", "boxd.test")).expect("utf8");
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"));
        let (head, body) = r.split_once("\r\n\r\n").expect("head");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("length")
            .parse()
            .expect("number");
        assert_eq!(body.len(), len);
        assert!(body.contains("nope") && body.contains("boxd.test"));
        assert!(!body.contains("<name>"), "escaped");
        let r = String::from_utf8(apex("boxd.test", 2222)).expect("utf8");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("ssh -p 2222 boxd.test new"), "{r}");
        assert!(String::from_utf8_lossy(&apex("boxd.sh", 22)).contains("`ssh boxd.sh new"));
        let r = String::from_utf8(not_served("example.com", "boxd.test")).expect("utf8");
        assert!(r.starts_with("HTTP/1.1 421 Misdirected Request\r\n"), "{r}");
        assert!(r.contains("example.com is not one of them"), "{r}");
    }
}

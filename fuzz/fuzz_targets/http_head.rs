//! Any bytes as what a client or a VM sends the HTTPS proxy: parsing a request or response
//! head never panics, and a head the proxy forwards parses again as a complete head with the
//! same method, target, body framing and status, with exactly one Host, every framing field
//! the client sent (no request smuggling through `Connection`), and a Connection field only
//! for an upgrade (the VM connection is otherwise kept); the body framing is
//! decided without panicking; the chunked decoder finds the same end whether fed whole or in
//! two pieces.
#![no_main]

use boxd_dataplane::https::framing::Chunked;
use boxd_dataplane::https::head::{Parse, parse_request, parse_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Parse::Complete(req) = parse_request(data, 64, 16384) {
        let out = req.forward("192.0.2.1".parse().expect("ip"), "a.boxd.test");
        let again = match parse_request(&out, 80, 1 << 20) {
            Parse::Complete(again) => again,
            other => panic!("forwarded request does not parse: {other:?}"),
        };
        assert_eq!(again.method, req.method);
        assert_eq!(again.target, req.target);
        assert_eq!(again.len, out.len());
        if let Ok(body) = req.body() {
            assert_eq!(again.body(), Ok(body), "the VM frames the body as we do");
        }
        let _ = req.body();
        let _ = req.wants_close();
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        let fields = usize::from(req.upgrade);
        assert_eq!(text.matches("\r\nconnection:").count(), fields, "{text}");
        assert_eq!(again.fields("host"), 1, "{text}");
        for framing in ["content-length", "transfer-encoding"] {
            assert_eq!(again.fields(framing), req.fields(framing), "{text}");
        }
    }
    if let Parse::Complete(resp) = parse_response(data, 64, 16384) {
        let _ = resp.body("GET");
        let _ = resp.keeps_alive();
        let out = resp.forward(data.len() % 2 == 0);
        match parse_response(&out, 80, 1 << 20) {
            Parse::Complete(again) => assert_eq!(again.status, resp.status),
            other => panic!("forwarded response does not parse: {other:?}"),
        }
    }
    let mut whole = Chunked::new(256);
    let a = whole.feed(data);
    if let Some(&cut) = data.first() {
        let cut = usize::from(cut) % (data.len() + 1);
        let mut split = Chunked::new(256);
        let b = split.feed(&data[..cut]).and_then(|n| {
            if split.done() {
                Ok(n)
            } else {
                split.feed(&data[cut..]).map(|m| cut + m)
            }
        });
        if let (Ok(x), Ok(y)) = (&a, &b) {
            assert_eq!(whole.done(), split.done());
            if whole.done() {
                assert_eq!(x, y, "same end");
            }
        }
    }
});

//! Any text as an SSH lobby command line: parsing never panics, and re-quoting the words it
//! split (as a shell would) parses to the same command or the same refusal.
#![no_main]

use boxd_dataplane::ssh::command::parse_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let first = parse_line(line);
    let Some(words) = shlex::split(line) else {
        return;
    };
    let Ok(joined) = shlex::try_join(words.iter().map(String::as_str)) else {
        return;
    };
    if joined.len() <= boxd_dataplane::ssh::command::MAX_LINE && first.is_ok() {
        assert_eq!(parse_line(&joined), first, "{line:?} -> {joined:?}");
    }
});

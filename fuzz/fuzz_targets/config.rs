//! Any bytes as a config file: parse and validate never panic, and a file that parses
//! re-serialises to TOML that parses to the same config.
#![no_main]

use boxd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::parse(text, std::path::Path::new("fuzz.toml")) {
        let again = toml::to_string(&cfg).expect("a valid config serialises");
        let back =
            Config::parse(&again, std::path::Path::new("again.toml")).expect("round trip parses");
        assert_eq!(back, cfg);
    }
});

//! Any bytes as a VM config: parsing and checking never panic, and an accepted config
//! serialises back to JSON that is accepted as the same config.
#![no_main]

use boxd_vmm::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.json");
    if let Ok(cfg) = VmConfig::parse(text, path) {
        let again = serde_json::to_string(&cfg).expect("serialises");
        assert_eq!(VmConfig::parse(&again, path).expect("round trip"), cfg);
    }
});

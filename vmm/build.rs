//! Builds the freestanding test guest (guest/) with the system's gcc into an ELF that the VMM
//! boots like a `vmlinux`. Its path is exported as `BOXD_TEST_GUEST` for tests and benches.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let elf = out.join("boxd-test-guest.elf");
    let sources = ["guest/start.S", "guest/main.c"];
    for f in sources.iter().chain(&["guest/guest.ld"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let cc = std::env::var("BOXD_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let status = Command::new(&cc)
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-O2",
            "-Wall",
            "-Werror",
            "-Wl,-T,guest/guest.ld",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&elf)
        .args(sources)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{cc}` to build the test guest (install gcc): {e}"));
    assert!(
        status.success(),
        "building the test guest with `{cc}` failed"
    );
    println!("cargo:rustc-env=BOXD_TEST_GUEST={}", elf.display());
}

//! The VMM's seccomp filter: allowed syscalls still work after it is installed; a syscall
//! outside it ends the process with status 31 and one line naming the syscall. Each case runs
//! in a child process (this test binary re-executed), since a filter cannot be removed.

use std::process::Command;

const CHILD: &str = "BOXD_SECCOMP_CHILD";

fn child(case: &str) -> std::process::Output {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, case)
        .output()
        .expect("re-exec")
}

/// Runs only as the child: installs the filter, then does what the case says.
#[test]
fn seccomp_child() {
    let Ok(case) = std::env::var(CHILD) else {
        return;
    };
    boxd_vmm::seccomp::install().expect("install");
    // Allowed after install: writing, allocating, sleeping, threads waiting on each other.
    let v: Vec<u8> = vec![7; 1 << 20];
    std::thread::sleep(std::time::Duration::from_millis(1));
    eprintln!("still alive {}", v.len());
    if case == "socket" {
        // Unix sockets are allowed (vsock), IP sockets are not.
        let unix = std::os::unix::net::UnixDatagram::unbound();
        eprintln!("unix socket ok: {}", unix.is_ok());
        let r = std::net::UdpSocket::bind("127.0.0.1:0");
        eprintln!("not reached: {r:?}");
    }
    if case == "blocked" {
        // openat is outside the filter: opening files after setup is not something a VMM does.
        let r = std::fs::File::open("/etc/hostname");
        eprintln!("not reached: {r:?}");
    }
    std::process::exit(0);
}

#[test]
fn allowed_syscalls_work_and_a_blocked_one_is_named_and_fatal() {
    let ok = child("allowed");
    let err = String::from_utf8_lossy(&ok.stderr);
    assert_eq!(ok.status.code(), Some(0), "{err}");
    assert!(err.contains("still alive 1048576"), "{err}");

    let bad = child("blocked");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(
        bad.status.code(),
        Some(boxd_vmm::seccomp::BLOCKED_EXIT),
        "{err}"
    );
    assert!(
        err.contains(&format!("seccomp blocked syscall {}", libc::SYS_openat)),
        "{err}"
    );
    assert!(!err.contains("not reached"), "{err}");

    let udp = child("socket");
    let err = String::from_utf8_lossy(&udp.stderr);
    assert_eq!(
        udp.status.code(),
        Some(boxd_vmm::seccomp::BLOCKED_EXIT),
        "{err}"
    );
    assert!(err.contains("unix socket ok: true"), "{err}");
    assert!(
        err.contains(&format!("seccomp blocked syscall {}", libc::SYS_socket)),
        "{err}"
    );
}

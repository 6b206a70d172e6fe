//! Pseudo-terminals and child processes: `openpty`, a child on the pty's slave as its
//! controlling terminal (a new session), window size changes, and signal names.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;

/// A pty pair.
pub struct Pty {
    /// The side the agent reads and writes.
    pub master: OwnedFd,
    /// The side the child gets as its terminal.
    pub slave: OwnedFd,
}

/// Opens a pty of `cols` × `rows`.
pub fn open(cols: u32, rows: u32) -> std::io::Result<Pty> {
    let mut master = -1;
    let mut slave = -1;
    let ws = winsize(cols, rows);
    // SAFETY: openpty writes two fds into the provided ints; name and termios may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just returned by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    Ok(Pty { master, slave })
}

fn winsize(cols: u32, rows: u32) -> libc::winsize {
    libc::winsize {
        ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
        ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Sets the window size of the pty whose master is `master`.
pub fn resize(master: &OwnedFd, cols: u32, rows: u32) {
    let ws = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer; the fd is a valid pty master.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Makes `cmd` run on `slave` as its controlling terminal, in a session of its own.
pub fn attach(cmd: &mut std::process::Command, slave: &OwnedFd) -> std::io::Result<()> {
    cmd.stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave.try_clone()?);
    // SAFETY: setsid and ioctl are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The signal number for an SSH signal name.
pub fn signal_number(sig: &russh::Sig) -> Option<i32> {
    use russh::Sig;
    Some(match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => libc::SIGUSR2,
            "CONT" => libc::SIGCONT,
            "STOP" => libc::SIGSTOP,
            "TSTP" => libc::SIGTSTP,
            "WINCH" => libc::SIGWINCH,
            _ => return None,
        },
    })
}

/// The SSH signal name for a signal number (RFC 4254 §6.10).
pub fn signal_name(n: i32) -> russh::Sig {
    use russh::Sig;
    match n {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        libc::SIGUSR2 => Sig::Custom("USR2".into()),
        other => Sig::Custom(format!("SIG{other}")),
    }
}

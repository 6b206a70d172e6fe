//! `boxd-agent --sftp-server`: an SFTP (version 3) server on stdin/stdout, for VMs whose image
//! has no `sftp-server` (the `minimal` image). The agent runs it as the session's user, the
//! way sshd runs OpenSSH's `sftp-server`, so the kernel checks every access; `scp` (which
//! speaks SFTP since OpenSSH 9) and `sftp` work in every image.
//!
//! The protocol is russh-sftp's; this file maps its requests onto the file system. Paths are
//! UTF-8 (russh-sftp's types are `String`s): a file whose name is not cannot be named. Like
//! OpenSSH's server, `SSH_FXP_SYMLINK` takes its two paths in OpenSSH's order (target first),
//! which is the reverse of the draft, and `rename` replaces an existing target
//! (`posix-rename`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use russh_sftp::protocol::{
    Attrs, Data, File as Entry, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode,
    Version,
};
use russh_sftp::server::StatusReply;

/// Largest read answered at once (OpenSSH asks for 32 KiB, some clients for more).
const MAX_READ: u32 = 256 * 1024;
/// Directory entries per `SSH_FXP_NAME` answer.
const ENTRIES_PER_READDIR: usize = 100;

/// Serves SFTP on stdin/stdout until the client closes it.
pub fn serve_stdio() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("boxd-agent --sftp-server: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let stream = Ending {
            inner: tokio::io::join(tokio::io::stdin(), tokio::io::stdout()),
            done: Some(done_tx),
        };
        russh_sftp::server::run(stream, Fs::default()).await;
        // russh-sftp serves on a task of its own and drops the stream when the client is done.
        let _ = done_rx.await;
    });
    std::process::ExitCode::SUCCESS
}

/// A stream that says when it is dropped.
struct Ending<S> {
    inner: S,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<S> Drop for Ending<S> {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            let _ = d.send(());
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Ending<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Ending<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a handle names.
enum Open {
    File(File),
    /// A directory's entries, the rest still to send.
    Dir(Vec<Entry>),
}

#[derive(Default)]
struct Fs {
    open: HashMap<String, Open>,
    next: u64,
}

fn fail(e: &std::io::Error) -> StatusReply {
    let code = match e.kind() {
        ErrorKind::NotFound => StatusCode::NoSuchFile,
        ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    StatusReply::new(code).with_message(e.to_string())
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

/// `path` made absolute against the working directory and cleaned of `.` and `..` without
/// touching the file system (the file need not exist), as OpenSSH's `realpath` answers.
fn absolute(path: &str) -> PathBuf {
    let base = if path.starts_with('/') {
        PathBuf::from("/")
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
    };
    let mut out = PathBuf::from("/");
    for c in base.join(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn attrs_of(m: &std::fs::Metadata) -> FileAttributes {
    FileAttributes::from(m)
}

/// Applies what `attrs` sets to `path`: size, permissions, owner, times (OpenSSH's order).
fn set_attrs(path: &Path, attrs: &FileAttributes) -> std::io::Result<()> {
    if let Some(size) = attrs.size {
        OpenOptions::new().write(true).open(path)?.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        std::os::unix::fs::chown(path, attrs.uid, attrs.gid)?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let t = |s: u32| std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(s));
        let times = std::fs::FileTimes::new()
            .set_accessed(t(atime))
            .set_modified(t(mtime));
        File::options()
            .write(true)
            .open(path)
            .or_else(|_| File::open(path))?
            .set_times(times)?;
    }
    Ok(())
}

impl Fs {
    fn keep(&mut self, open: Open) -> String {
        self.next += 1;
        let h = self.next.to_string();
        self.open.insert(h.clone(), open);
        h
    }

    fn file(&self, handle: &str) -> Result<&File, StatusReply> {
        match self.open.get(handle) {
            Some(Open::File(f)) => Ok(f),
            _ => Err(StatusReply::new(StatusCode::Failure).with_message("no such open file")),
        }
    }
}

impl russh_sftp::server::Handler for Fs {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let mut o: OpenOptions = pflags.into();
        o.mode(attrs.permissions.map_or(0o666, |p| p & 0o7777));
        let f = o.open(&filename).map_err(|e| fail(&e))?;
        Ok(Handle {
            id,
            handle: self.keep(Open::File(f)),
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        self.open.remove(&handle);
        Ok(ok(id))
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let f = self.file(&handle)?;
        let mut data = vec![0; len.min(MAX_READ) as usize];
        let n = f.read_at(&mut data, offset).map_err(|e| fail(&e))?;
        if n == 0 && !data.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        data.truncate(n);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        self.file(&handle)?
            .write_all_at(&data, offset)
            .map_err(|e| fail(&e))?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let m = std::fs::symlink_metadata(&path).map_err(|e| fail(&e))?;
        Ok(Attrs {
            id,
            attrs: attrs_of(&m),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let m = std::fs::metadata(&path).map_err(|e| fail(&e))?;
        Ok(Attrs {
            id,
            attrs: attrs_of(&m),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let m = self.file(&handle)?.metadata().map_err(|e| fail(&e))?;
        Ok(Attrs {
            id,
            attrs: attrs_of(&m),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        set_attrs(Path::new(&path), &attrs).map_err(|e| fail(&e))?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        use std::os::fd::AsRawFd as _;
        let fd = self.file(&handle)?.as_raw_fd();
        // The open file's own path, so the same rules apply as for `setstat`.
        set_attrs(Path::new(&format!("/proc/self/fd/{fd}")), &attrs).map_err(|e| fail(&e))?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let dir = Path::new(&path);
        let mut entries = Vec::new();
        for name in [".", ".."] {
            if let Ok(m) = std::fs::symlink_metadata(dir.join(name)) {
                entries.push(Entry::new(name, attrs_of(&m)));
            }
        }
        for e in std::fs::read_dir(dir).map_err(|e| fail(&e))?.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue; // not UTF-8: cannot be named over this protocol
            };
            if let Ok(m) = e.metadata() {
                entries.push(Entry::new(name, attrs_of(&m)));
            }
        }
        entries.reverse();
        Ok(Handle {
            id,
            handle: self.keep(Open::Dir(entries)),
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Dir(rest)) = self.open.get_mut(&handle) else {
            return Err(
                StatusReply::new(StatusCode::Failure).with_message("no such open directory")
            );
        };
        if rest.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        let n = rest.len().min(ENTRIES_PER_READDIR);
        let files = rest.split_off(rest.len() - n).into_iter().rev().collect();
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        std::fs::remove_file(&filename).map_err(|e| fail(&e))?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(attrs.permissions.map_or(0o777, |p| p & 0o7777))
            .create(&path)
            .map_err(|e| fail(&e))?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        std::fs::remove_dir(&path).map_err(|e| fail(&e))?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = std::fs::canonicalize(absolute(&path)).unwrap_or_else(|_| absolute(&path));
        Ok(Name {
            id,
            files: vec![Entry::dummy(p.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        std::fs::rename(&oldpath, &newpath).map_err(|e| fail(&e))?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = std::fs::read_link(&path).map_err(|e| fail(&e))?;
        Ok(Name {
            id,
            files: vec![Entry::dummy(target.to_string_lossy())],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        // OpenSSH sends the target first (see the module's note).
        std::os::unix::fs::symlink(&linkpath, &targetpath).map_err(|e| fail(&e))?;
        Ok(ok(id))
    }
}

#[cfg(test)]
mod tests {
    use super::absolute;

    #[test]
    fn paths_are_made_absolute_and_clean() {
        assert_eq!(absolute("/a/./b/../c"), std::path::PathBuf::from("/a/c"));
        assert_eq!(absolute("/../.."), std::path::PathBuf::from("/"));
        let here = std::env::current_dir().expect("cwd");
        assert_eq!(absolute("x/.."), here);
    }
}

//! mount(2) with Rust strings and paths, for the sandbox's root and layer and for `confine`.

use std::ffi::CString;
use std::path::Path;

use super::errno;

/// [`mount`] with a path as the source.
pub(crate) fn mount_path(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src = src
        .map(|p| {
            p.to_str()
                .ok_or_else(|| format!("{} is not UTF-8", p.display()))
        })
        .transpose()?;
    mount(src, target, fstype, flags, data)
}

pub(crate) fn cstr(s: impl AsRef<[u8]>) -> Result<CString, String> {
    CString::new(s.as_ref()).map_err(|_| "path contains a NUL byte".to_owned())
}

pub(crate) fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target.as_os_str().as_bytes())?;
    let fstype_c = fstype.map(cstr).transpose()?;
    let data_c = data.map(cstr).transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a live NUL-terminated string.
    let r = unsafe {
        libc::mount(
            p(&src_c),
            target_c.as_ptr(),
            p(&fstype_c),
            flags,
            p(&data_c).cast(),
        )
    };
    if r != 0 {
        return Err(errno(&format!("mount {}", target.display())));
    }
    Ok(())
}

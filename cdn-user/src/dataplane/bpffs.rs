//! The bpf filesystem the maps and the XDP link are pinned on: pins are what let a restarted
//! controller find the running data plane again.

use std::path::{Path, PathBuf};

/// True if `dir` is on a bpf filesystem (pinning needs one).
pub fn is_bpffs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::BPF_FS_MAGIC
    }
}

/// Makes sure `dir` exists on a bpf filesystem, mounting one if needed: on `/sys/fs/bpf` when
/// `dir` is below it (the usual place), otherwise on `dir` itself. Returns where a bpffs was
/// mounted, if one was.
pub fn ensure_bpffs(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    // The nearest existing directory decides: a pin directory that does not exist yet on an
    // existing bpffs is simply created.
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        std::fs::create_dir_all(dir)?;
        return Ok(None);
    }
    let sys = Path::new("/sys/fs/bpf");
    let mount_point = if dir.starts_with(sys) { sys } else { dir };
    let mut mounted = None;
    if !(mount_point.exists() && is_bpffs(mount_point)) {
        std::fs::create_dir_all(mount_point)?;
        mount_bpffs(mount_point)?;
        mounted = Some(mount_point.to_path_buf());
    }
    std::fs::create_dir_all(dir)?;
    if !is_bpffs(dir) {
        return Err(std::io::Error::other(format!(
            "{} is not on a bpf filesystem",
            dir.display()
        )));
    }
    Ok(mounted)
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(at.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    let fstype = c"bpf";
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

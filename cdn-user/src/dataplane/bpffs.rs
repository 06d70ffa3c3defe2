//! The bpf filesystem the maps and the XDP link are pinned on: pins are what let a restarted
//! controller find the running data plane again.
//!
//! Pins last as long as the filesystem holding them is mounted somewhere. A bpffs mounted in a
//! private mount namespace (what `ip netns exec` and `unshare -m` give a process) goes away
//! with the last process in that namespace, and the pinned XDP links with it: the program is
//! detached and every flow is reset, exactly what pinning is meant to prevent. [`pin_lifetime`]
//! tells the two apart.

use std::os::unix::fs::MetadataExt as _;
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
        // A mount hides what the directory holds; never do that to a directory in use.
        if mount_point.exists() && std::fs::read_dir(mount_point)?.next().is_some() {
            return Err(std::io::Error::other(format!(
                "{} is not on a bpf filesystem and is not empty: mounting one there would hide \
                 its contents; mount a bpf filesystem there yourself (mount -t bpf bpf {0}) or \
                 choose an empty directory for node.bpffs",
                mount_point.display()
            )));
        }
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

/// Removes a bpf filesystem this process mounted (at start-up, before anything is pinned).
pub fn unmount(at: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(at.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: the path is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether pins under a directory outlive the process that makes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinLifetime {
    /// The bpf filesystem is also mounted in the mount namespace of PID 1 (the host's, or a
    /// container's init): it stays after this process and its namespace are gone.
    Outlives,
    /// The bpf filesystem is mounted only in namespaces other than PID 1's: it goes away with
    /// the last process in them.
    EndsWithNamespace,
    /// Cannot tell, and why: PID 1's mount table is not readable, or this process is PID 1.
    Unknown(String),
}

/// Whether pins under `dir` (on a bpf filesystem) outlive this process.
///
/// The rule: a bpffs outlives us if the same filesystem (the same device number; every bpffs
/// mount is a filesystem of its own, while the copies a new mount namespace starts with share
/// it) appears as a `bpf` mount in `/proc/1/mountinfo`. PID 1's mount namespace lives as long
/// as the system (or the container), and a filesystem mounted there keeps its pins whatever
/// becomes of ours. This catches every way pins could be lost: a bpffs this process mounted
/// in a private namespace; one mounted there earlier by another process of the namespace;
/// but not one that propagated to the host (a shared mount), which does outlive us.
/// `/proc/1/mountinfo` is readable by anyone, unlike `/proc/1/ns/mnt`, which needs ptrace
/// rights over PID 1 (a namespace comparison would fail under a unit without them).
pub fn pin_lifetime(dir: &Path) -> PinLifetime {
    let dev = match std::fs::metadata(dir) {
        Ok(meta) => meta.dev(),
        Err(e) => return PinLifetime::Unknown(format!("{}: {e}", dir.display())),
    };
    if std::process::id() == 1 {
        return PinLifetime::Unknown("this process is PID 1".to_owned());
    }
    match std::fs::read_to_string("/proc/1/mountinfo") {
        Ok(table) if bpf_mounted(&table, libc::major(dev), libc::minor(dev)) => {
            PinLifetime::Outlives
        }
        Ok(_) => PinLifetime::EndsWithNamespace,
        Err(e) => PinLifetime::Unknown(format!("reading /proc/1/mountinfo: {e}")),
    }
}

/// Whether a mount table (`/proc/<pid>/mountinfo`) has a bpf filesystem with device
/// `major:minor`.
fn bpf_mounted(mountinfo: &str, major: u32, minor: u32) -> bool {
    let dev = format!("{major}:{minor}");
    mountinfo.lines().any(|line| {
        // "id parent major:minor root mount-point options [optional fields...] - fstype ..."
        let mut fields = line.split_ascii_whitespace();
        let this_dev = fields.nth(2);
        let fstype = fields.skip_while(|f| *f != "-").nth(1);
        this_dev == Some(dev.as_str()) && fstype == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
51 23 0:40 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:7 - bpf bpf rw,mode=700
60 27 0:52 / /tmp/x/bpffs rw,relatime master:9 - bpf bpf rw
";

    #[test]
    fn bpf_mounts_are_found_by_device_and_type() {
        assert!(bpf_mounted(MOUNTINFO, 0, 40));
        assert!(bpf_mounted(MOUNTINFO, 0, 52));
        // Another device, or the device of something that is not a bpffs.
        assert!(!bpf_mounted(MOUNTINFO, 0, 41));
        assert!(!bpf_mounted(MOUNTINFO, 0, 21));
        assert!(!bpf_mounted(MOUNTINFO, 254, 0));
        assert!(!bpf_mounted("", 0, 40));
    }
}

//! A free-space check before the build: a full disk otherwise shows up minutes later as an
//! LLVM "IO failure on output stream" deep inside some crate's build, which says nothing about
//! the cause.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, Result, bail};

const GIB: u64 = 1 << 30;

/// What a build from a fresh clone writes under `target/`: the release build, the tests, the
/// nested eBPF builds and the two static `dist` builds with their packages (measured after a
/// full `cargo xtask test` of a fresh clone: 3.8 GiB), with room for the tests' scratch files
/// and for growth.
const FRESH_BUILD: u64 = 6 * GIB;
/// What an incremental rebuild writes on top of an existing `target/`.
const REBUILD: u64 = 2 * GIB;

/// Fails, with the numbers, if the file system holding `target` has less room than the build
/// about to run needs.
pub fn ensure_room_for_build(target: &Path) -> Result<()> {
    let fresh = !target.join("release").exists();
    let needed = if fresh { FRESH_BUILD } else { REBUILD };
    // The target directory may not exist yet: ask about the closest ancestor that does.
    let probe = target
        .ancestors()
        .find(|p| p.exists())
        .context("no existing ancestor of the target directory")?;
    let free = free_bytes(probe)?;
    if free < needed {
        bail!(
            "only {:.1} GiB free on the file system of {} but a {} build needs about {} GiB; \
             free some space (old worktrees, other target/ directories) and run again",
            free as f64 / GIB as f64,
            probe.display(),
            if fresh { "fresh" } else { "incremental" },
            needed / GIB
        );
    }
    Ok(())
}

/// Bytes available to an unprivileged user on the file system holding `path`.
fn free_bytes(path: &Path) -> Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points at writable memory
    // of the struct's size; the struct is only read after the call reported success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    // SAFETY: statvfs succeeded, so it filled in the whole struct.
    let stat = unsafe { stat.assume_init() };
    // Both are u64 on the 64-bit hosts this runs on; saturate rather than wrap.
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_free_space_of_an_existing_directory() {
        let free = free_bytes(Path::new("/")).expect("statvfs /");
        assert!(free > 0);
    }

    #[test]
    fn asks_the_closest_existing_ancestor() {
        // Nothing here exists below /: the check must still answer (and, on a machine with
        // room, pass) rather than fail on the missing path.
        let missing = Path::new("/nonexistent-cdn-steer-target/a/b");
        let result = ensure_room_for_build(missing);
        let free = free_bytes(Path::new("/")).expect("statvfs /");
        assert_eq!(result.is_ok(), free >= FRESH_BUILD, "{result:?}");
    }
}

//! A bpf filesystem of a test's own: the controller pins its program and maps there, and the
//! test never touches the host's `/sys/fs/bpf`. Unmounted when dropped, which removes every pin
//! in it, also when the test fails.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cmd::run;

pub struct BpfMount {
    path: PathBuf,
    /// Whether the mount point was made here (and is removed with the mount).
    own_dir: bool,
}

impl BpfMount {
    /// Mounts a bpf filesystem on `at` (created if missing; left in place on drop, as it
    /// usually lives in a scratch directory that goes anyway).
    pub fn new(at: &Path) -> Result<Self> {
        std::fs::create_dir_all(at)?;
        run("mount", &["-t", "bpf", "bpf", &at.to_string_lossy()])?;
        Ok(Self {
            path: at.to_owned(),
            own_dir: false,
        })
    }

    /// Mounts one on a new directory in the temporary directory, named after `tag` (which
    /// tells apart the tests of one binary: they run at the same time) and this process.
    pub fn temp(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("cdnt-bpffs-{tag}-{}", std::process::id()));
        let mut mount = Self::new(&dir)?;
        mount.own_dir = true;
        Ok(mount)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the mount (a pin directory for one controller).
    pub fn join(&self, rest: impl AsRef<Path>) -> PathBuf {
        self.path.join(rest)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[&self.path.to_string_lossy()]) {
            eprintln!("cleanup: {e:#}");
        }
        if self.own_dir {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

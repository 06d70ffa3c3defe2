//! Scratch directories for test files (configurations, sockets, logs), removed when dropped.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh directory `<tmp>/cdnt-<tag>-<pid>-<n>`, removed with its contents when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "cdnt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Leftovers of a crashed earlier run that had the same pid would only confuse a test.
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing leftover {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("cleanup: removing {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_unique_and_removed() -> Result<()> {
        let a = ScratchDir::new("scratch")?;
        let b = ScratchDir::new("scratch")?;
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path().join("f"), "x")?;
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
        assert!(b.path().is_dir());
        Ok(())
    }
}

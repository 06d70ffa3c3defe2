//! The bpf filesystem of the pins (`node.bpffs`): what `cdn-steer run` needs to find the data
//! plane again after a restart. The daemon mounts one itself when missing (on `/sys/fs/bpf`
//! for a path below it, else on the path), so a missing mount is fine as long as the kernel
//! has the filesystem and the path can become a directory.

use std::path::Path;

use super::{Finding, Group};
use crate::{config::Config, dataplane::bpffs::is_bpffs};

pub(super) fn check(cfg: &Config) -> Vec<Finding> {
    let dir = cfg.node.bpffs.as_path();
    let item = dir.display().to_string();
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let finding = if existing == dir && !dir.is_dir() {
        Finding::problem(
            Group::Bpffs,
            item,
            "exists and is not a directory: nothing can be pinned there",
            Some(format!(
                "remove {}, or set node.bpffs to a directory on a bpf filesystem",
                dir.display()
            )),
        )
    } else if is_bpffs(existing) {
        let pins = if existing == dir {
            std::fs::read_dir(dir).map_or(0, Iterator::count)
        } else {
            0
        };
        let detail = match pins {
            0 => "on a bpf filesystem".to_owned(),
            n => format!("on a bpf filesystem, {n} pins from a running or earlier controller"),
        };
        Finding::ok(Group::Bpffs, item, detail)
    } else if !kernel_has_bpffs() {
        Finding::problem(
            Group::Bpffs,
            item,
            "not on a bpf filesystem, and this kernel has none to mount (no \"bpf\" in \
             /proc/filesystems)",
            Some("use a kernel built with CONFIG_BPF_SYSCALL".to_owned()),
        )
    } else {
        let sys = Path::new("/sys/fs/bpf");
        let at = if dir.starts_with(sys) { sys } else { dir };
        Finding::ok(
            Group::Bpffs,
            item,
            format!(
                "not on a bpf filesystem yet; `cdn-steer run` mounts one on {}",
                at.display()
            ),
        )
    };
    vec![finding]
}

fn kernel_has_bpffs() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().last() == Some("bpf"))
    })
}

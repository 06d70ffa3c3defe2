//! Builds the XDP program (nightly, bpfel-unknown-none) so the controller can embed it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("cdn-user has no parent directory"))?
        .join("cdn-ebpf");
    let root = root.to_str().context("non UTF-8 path to cdn-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cdn-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

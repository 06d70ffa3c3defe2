//! `cargo xtask deb`: one Debian package per architecture, `target/deb/cdn-steer_<version>_<arch>.deb`,
//! from the static binaries `cargo xtask dist` builds, then checked with lintian.
//!
//! The package is laid out here and packed with `dpkg-deb --root-owner-group --build`, rather
//! than with cargo-deb: the binaries are already built (and cross-built) by `dist`, the package
//! has no shared-library dependencies to compute, and what is left (a file list, a control file,
//! md5sums) is less code than cargo-deb's configuration plus the minutes `cargo install
//! cargo-deb` takes on every fresh machine and in CI.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd,
    dist::{self, Arch},
};

const NAME: &str = "cdn-steer";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// What `cargo xtask deb` leaves under the target directory.
const OUT_DIR: &str = "target/deb";
/// The configuration file, a conffile: dpkg keeps the operator's edits across upgrades and
/// removal, and deletes it only on purge.
const CONFFILE: &str = "/etc/cdn-steer/cdn-steer.toml";

/// Folders of `packaging/` copied whole to `/usr/share/cdn-steer/<folder>/`: the BIRD snippet,
/// the Grafana dashboard and the Prometheus alert rules (whatever is there at build time).
const SHARED_FOLDERS: &[&str] = &["bird", "grafana", "prometheus"];

/// The package's path for `arch`.
pub fn path(arch: &Arch) -> PathBuf {
    cmd::workspace_root()
        .join(OUT_DIR)
        .join(format!("{NAME}_{VERSION}_{}.deb", arch.deb))
}

/// Builds both packages from the binaries of `dist::build`.
pub fn build() -> Result<Vec<PathBuf>> {
    let root = cmd::workspace_root();
    let packaging = root.join("packaging");
    let changelog = read(&packaging.join("debian/changelog"))?;
    let (maintainer, date) = check_changelog(&changelog)?;
    let epoch = seconds_since_epoch(&date)?;
    let out = root.join(OUT_DIR);
    let generated = generate(&out.join("generated"))?;

    let mut debs = Vec::new();
    for arch in dist::ARCHES {
        let stage = Stage::new(out.join(format!("{NAME}_{VERSION}_{}", arch.deb)))?;
        stage.copy(&arch.binary(), "usr/bin/cdn-steer", 0o755)?;
        stage.copy(
            &packaging.join("systemd/cdn-steer.service"),
            "usr/lib/systemd/system/cdn-steer.service",
            0o644,
        )?;
        stage.copy(
            &root.join("cdn-user/src/config/example.toml"),
            &CONFFILE[1..],
            0o644,
        )?;
        for folder in SHARED_FOLDERS {
            for file in files_in(&packaging.join(folder))? {
                let name = file.file_name().context("file without a name")?;
                let dest = Path::new("usr/share/cdn-steer").join(folder).join(name);
                stage.copy(&file, dest.to_str().context("non UTF-8 file name")?, 0o644)?;
            }
        }
        for page in files_in(&generated.join("man"))? {
            let name = page.file_name().context("man page without a name")?;
            let dest = Path::new("usr/share/man/man1").join(name);
            stage.copy_gzipped(&page, dest.to_str().context("non UTF-8 file name")?)?;
        }
        for (file, dest) in COMPLETIONS {
            stage.copy(&generated.join(file), dest, 0o644)?;
        }
        let doc = "usr/share/doc/cdn-steer";
        stage.copy(
            &packaging.join("debian/copyright"),
            &format!("{doc}/copyright"),
            0o644,
        )?;
        // Why the static binary is as it should be (the file says so).
        stage.copy(
            &packaging.join("debian/lintian-overrides"),
            "usr/share/lintian/overrides/cdn-steer",
            0o644,
        )?;
        // A native package (its version has no Debian revision): the changelog is changelog.gz.
        stage.copy_gzipped(
            &packaging.join("debian/changelog"),
            &format!("{doc}/changelog.gz"),
        )?;

        stage.control(arch, &maintainer, &packaging)?;
        let deb = path(arch);
        cmd::run(
            cmd::new("dpkg-deb")
                // The changelog's date for every time stamp in the package, so the same
                // inputs give the same .deb.
                .env("SOURCE_DATE_EPOCH", &epoch)
                .args(["--root-owner-group", "-Zxz", "--build"])
                .arg(&stage.root)
                .arg(&deb),
        )?;
        let size = fs::metadata(&deb)?.len();
        println!(
            "{}: {size} bytes ({:.2} MiB)",
            deb.display(),
            size as f64 / (1024.0 * 1024.0)
        );
        debs.push(deb);
    }
    Ok(debs)
}

/// Where the shell completions go: the vendor directories bash-completion, zsh and fish read.
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/cdn-steer"),
    ("zsh", "usr/share/zsh/vendor-completions/_cdn-steer"),
    ("fish", "usr/share/fish/vendor_completions.d/cdn-steer.fish"),
];

/// Runs the host's binary to write the man pages (`<dir>/man/`) and the completion scripts
/// (`<dir>/{bash,zsh,fish}`): they come from the CLI definition itself, so they cannot drift
/// from it.
fn generate(dir: &Path) -> Result<PathBuf> {
    let binary = dist::host_arch()?.binary();
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let man = dir.join("man");
    fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    cmd::run(
        cmd::new(path_str(&binary)?)
            .args(["generate", "man"])
            .arg(&man),
    )?;
    for (shell, _) in COMPLETIONS {
        let out = cmd::output(cmd::new(path_str(&binary)?).args(["generate", shell]))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "`{} generate {shell}` failed ({}): {}",
                binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        fs::write(dir.join(shell), &out.stdout)?;
    }
    Ok(dir.to_owned())
}

/// Checks that the changelog's latest entry is this version, and returns its maintainer (the
/// `Name <address>` of its trailer line), which the control file repeats, and its date.
fn check_changelog(changelog: &str) -> Result<(String, String)> {
    let first = changelog.lines().next().unwrap_or_default();
    let expected = format!("{NAME} ({VERSION}) ");
    if !first.starts_with(&expected) {
        bail!(
            "packaging/debian/changelog starts with `{first}`, not an entry for {NAME} {VERSION}: \
             add one for the version in Cargo.toml"
        );
    }
    changelog
        .lines()
        .find_map(|line| line.strip_prefix(" -- "))
        .and_then(|trailer| trailer.split_once("  "))
        .map(|(maintainer, date)| (maintainer.to_owned(), date.trim().to_owned()))
        .context("packaging/debian/changelog: no ` -- Name <address>  date` line")
}

/// An RFC 2822 date (the changelog's) as seconds since the epoch, by `date`.
fn seconds_since_epoch(date: &str) -> Result<String> {
    let out = cmd::output(cmd::new("date").args(["-u", "-d", date, "+%s"]))?;
    let seconds = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || seconds.parse::<u64>().is_err() {
        bail!("packaging/debian/changelog: `{date}` is not a date `date -d` reads");
    }
    Ok(seconds)
}

/// Runs lintian on the packages, printing what it says; fails on any error (`E:` line), and
/// on any exit status but 0 (2: errors found, 1: lintian itself failed).
pub fn lintian(debs: &[PathBuf]) -> Result<()> {
    let out = cmd::output(cmd::new("lintian").args(debs))?;
    let report = String::from_utf8_lossy(&out.stdout);
    println!("lintian: {}\n{report}", out.status);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    if !errors.is_empty() || !out.status.success() {
        bail!(
            "lintian ({}): {} error(s)\n{}\n{}",
            out.status,
            errors.len(),
            errors.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A package's file tree under construction.
struct Stage {
    root: PathBuf,
}

impl Stage {
    /// An empty tree at `root` (a previous one is removed).
    fn new(root: PathBuf) -> Result<Self> {
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        Ok(Self { root })
    }

    /// Copies `src` to `dest` (relative to the root), creating its directories with mode 0755.
    fn copy(&self, src: &Path, dest: &str, mode: u32) -> Result<()> {
        let contents = fs::read(src).with_context(|| {
            format!(
                "reading {} (for /{dest}); `cargo xtask deb` builds what it generates",
                src.display()
            )
        })?;
        self.write(dest, &contents, mode)
    }

    fn write(&self, dest: &str, contents: &[u8], mode: u32) -> Result<()> {
        let path = self.root.join(dest);
        let mut dir = path.parent().context("a file at the root")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Directories made under a restrictive umask would be packed as such.
        while dir.starts_with(&self.root) {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
            dir = dir.parent().context("the root has a parent")?;
        }
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))
    }

    /// Copies `src` to `dest`, compressed as Debian wants man pages and changelogs: `gzip -9n`
    /// (no name or time stamp inside, so the same input gives the same bytes).
    fn copy_gzipped(&self, src: &Path, dest: &str) -> Result<()> {
        let out = cmd::output(cmd::new("gzip").args(["-9n", "-c"]).arg(src))?;
        if !out.status.success() {
            bail!("gzip {} failed ({})", src.display(), out.status);
        }
        let dest = if dest.ends_with(".gz") {
            dest.to_owned()
        } else {
            format!("{dest}.gz")
        };
        self.write(&dest, &out.stdout, 0o644)
    }

    /// Writes DEBIAN/: control, conffiles, md5sums and the maintainer scripts.
    fn control(&self, arch: &Arch, maintainer: &str, packaging: &Path) -> Result<()> {
        let files = self.files()?;
        // Installed-Size in KiB, as dpkg-gencontrol counts it: each file rounded up.
        let installed_kib: u64 = files
            .iter()
            .map(|f| Ok(fs::metadata(self.root.join(f))?.len().div_ceil(1024)))
            .sum::<Result<u64>>()?;
        let control = format!(
            "Package: {NAME}\n\
             Version: {VERSION}\n\
             Architecture: {}\n\
             Maintainer: {maintainer}\n\
             Installed-Size: {installed_kib}\n\
             Section: net\n\
             Priority: optional\n\
             Recommends: bird2\n\
             Description: XDP anycast steering controller\n \
             cdn-steer runs on every node of an anycast cluster and keeps each flow on the\n \
             server that owns it: an XDP program steers packets that land on the wrong\n \
             node to the owner, by a consistent (Maglev) table every node computes alike.\n \
             The controller loads the program, keeps its tables, health-checks the\n \
             members, announces the VIPs through BIRD and serves Prometheus metrics.\n \
             .\n \
             The service is installed but not enabled: edit the configuration,\n \
             {CONFFILE}, first.\n",
            arch.deb
        );
        self.write("DEBIAN/control", control.as_bytes(), 0o644)?;
        self.write(
            "DEBIAN/conffiles",
            format!("{CONFFILE}\n").as_bytes(),
            0o644,
        )?;
        // Conffiles are left out, as dpkg keeps their sums itself.
        let summed: Vec<&String> = files.iter().filter(|f| !f.starts_with("etc/")).collect();
        let out = cmd::output(
            cmd::new("md5sum")
                .current_dir(&self.root)
                .arg("--")
                .args(summed),
        )?;
        if !out.status.success() {
            bail!("md5sum failed ({})", out.status);
        }
        self.write("DEBIAN/md5sums", &out.stdout, 0o644)?;
        for script in ["postinst", "postrm"] {
            self.copy(
                &packaging.join("debian").join(script),
                &format!("DEBIAN/{script}"),
                0o755,
            )?;
        }
        Ok(())
    }

    /// Every file of the tree (not DEBIAN/), relative to the root, sorted.
    fn files(&self) -> Result<Vec<String>> {
        fn walk(dir: &Path, root: &Path, files: &mut Vec<String>) -> Result<()> {
            for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
                let path = entry?.path();
                if path.is_dir() {
                    walk(&path, root, files)?;
                } else {
                    let relative = path.strip_prefix(root)?;
                    files.push(relative.to_str().context("non UTF-8 path")?.to_owned());
                }
            }
            Ok(())
        }
        let mut files = Vec::new();
        walk(&self.root, &self.root, &mut files)?;
        files.retain(|f| !f.starts_with("DEBIAN/"));
        files.sort();
        Ok(files)
    }
}

/// The files directly in `dir`, sorted; none when `dir` does not exist.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("non UTF-8 path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_changelog_is_for_this_version() -> Result<()> {
        let changelog = read(&cmd::workspace_root().join("packaging/debian/changelog"))?;
        let (maintainer, date) = check_changelog(&changelog)?;
        assert!(
            maintainer.contains('<') && maintainer.ends_with('>'),
            "{maintainer}"
        );
        assert!(
            seconds_since_epoch(&date)?.parse::<u64>()? > 1_700_000_000,
            "{date}"
        );
        let e = check_changelog("cdn-steer (0.0.1) unstable; urgency=low\n").expect_err("old");
        assert!(e.to_string().contains("not an entry"), "{e}");
        Ok(())
    }
}

//! The artefacts operators install: the static binaries of `cargo xtask dist` and the Debian
//! packages of `cargo xtask deb`. Building them takes minutes (fat LTO, two architectures), so
//! `cargo xtask test` builds them in its `package` stage before the tests, and these tests use
//! them; a missing artefact fails with the command that builds it.
//!
//! The arm64 binary runs under qemu-user; the amd64 package is installed, used, removed and
//! purged in a scratch root with its own dpkg database, never in the host's.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use cdn_test_support::scratch::ScratchDir;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
}

fn example_config() -> PathBuf {
    root().join("cdn-user/src/config/example.toml")
}

/// An artefact of the package stage, or a failure naming the command that builds it.
fn artefact(relative: &str, built_by: &str) -> Result<PathBuf> {
    let path = root().join(relative);
    ensure!(
        path.is_file(),
        "{} is missing: `{built_by}` builds it (`cargo xtask test` does, in its package stage)",
        path.display()
    );
    Ok(path)
}

fn dist_binary(triple: &str) -> Result<PathBuf> {
    artefact(
        &format!("target/{triple}/dist/cdn-steer"),
        "cargo xtask dist",
    )
}

fn deb(arch: &str) -> Result<PathBuf> {
    artefact(
        &format!("target/deb/cdn-steer_{VERSION}_{arch}.deb"),
        "cargo xtask deb",
    )
}

const X86_64: &str = "x86_64-unknown-linux-gnu";
const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Runs `program` with `args`, whatever its exit status.
fn output(program: &Path, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {}", program.display()))
}

/// The arm64 binary, run under qemu-user.
fn qemu(binary: &Path, args: &[&str]) -> Result<Output> {
    let mut all = vec![binary.to_str().context("non UTF-8 path")?];
    all.extend_from_slice(args);
    output(Path::new("qemu-aarch64"), &all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a command said and how it ended, with the one line that differs from run to run (how
/// long the table took to build) made constant, for comparing two runs.
fn transcript(out: &Output) -> String {
    let text = format!(
        "{}\n--- stderr\n{}\n--- {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    text.lines()
        .map(|line| match line.split_once(", built in ") {
            Some((head, tail)) => match tail.split_once(" with ") {
                Some((_, rest)) => format!("{head}, built in _ with {rest}"),
                None => format!("{head}, built in _"),
            },
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The ELF machine of a file: 62 for x86-64, 183 for arm64.
fn elf_machine(path: &Path) -> Result<u16> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.len() > 20 && bytes.starts_with(b"\x7fELF"),
        "{} is not an ELF file",
        path.display()
    );
    Ok(u16::from_le_bytes([bytes[18], bytes[19]]))
}

/// Fails unless `path` is statically linked: no program interpreter, no shared libraries.
fn assert_static(path: &Path) -> Result<()> {
    let out = output(
        Path::new("readelf"),
        &["-ldW", path.to_str().context("path")?],
    )?;
    ensure!(out.status.success(), "readelf failed: {}", transcript(&out));
    let text = stdout(&out);
    ensure!(
        !text.contains("INTERP") && !text.contains("(NEEDED)"),
        "{} is dynamically linked:\n{text}",
        path.display()
    );
    Ok(())
}

#[test]
fn both_binaries_are_static_for_their_architecture() -> Result<()> {
    for (triple, machine) in [(X86_64, 62), (AARCH64, 183)] {
        let binary = dist_binary(triple)?;
        assert_eq!(elf_machine(&binary)?, machine, "{}", binary.display());
        assert_static(&binary)?;
    }
    Ok(())
}

#[test]
fn aarch64_binary_runs_version_and_check_under_qemu() -> Result<()> {
    let arm = dist_binary(AARCH64)?;
    let x86 = dist_binary(X86_64)?;
    let version = qemu(&arm, &["--version"])?;
    assert!(version.status.success(), "{}", transcript(&version));
    assert_eq!(stdout(&version), format!("cdn-steer {VERSION}\n"));

    let example = example_config();
    let example = example.to_str().context("path")?;
    // The file alone: the host checks read this machine's netlink, which qemu-user only
    // partly emulates (generic netlink is missing), so they would differ for that reason.
    let on_arm = qemu(&arm, &["check", "--no-host", "-c", example])?;
    let on_x86 = output(&x86, &["check", "--no-host", "-c", example])?;
    assert!(
        stdout(&on_arm).contains("configuration OK: node node-a"),
        "{}",
        transcript(&on_arm)
    );
    assert_eq!(transcript(&on_arm), transcript(&on_x86));

    // A broken configuration is refused alike: same exit code, same message.
    let dir = ScratchDir::new("pkg-check")?;
    let broken = dir.path().join("broken.toml");
    let text = fs::read_to_string(example_config())?.replace("weight = 50", "weight = -50");
    ensure!(
        text != fs::read_to_string(example_config())?,
        "the example has no `weight = 50` to break any more"
    );
    fs::write(&broken, text)?;
    let broken = broken.to_str().context("path")?;
    let on_arm = qemu(&arm, &["check", "-c", broken])?;
    let on_x86 = output(&x86, &["check", "-c", broken])?;
    assert!(!on_arm.status.success(), "{}", transcript(&on_arm));
    assert_eq!(transcript(&on_arm), transcript(&on_x86));
    Ok(())
}

/// `lookup --offline` computes a flow's owner from the configuration alone: the arm64 binary
/// must give the x86-64 binary's answer (same hash, same table) for every flow.
#[test]
fn aarch64_offline_lookup_matches_x86_64() -> Result<()> {
    let arm = dist_binary(AARCH64)?;
    let x86 = dist_binary(X86_64)?;
    let example = example_config();
    let example = example.to_str().context("path")?;
    let flows = [
        ("198.51.100.7:40000", "192.0.2.1:443", "tcp"),
        ("198.51.100.8:40001", "192.0.2.1:80", "tcp"),
        ("203.0.113.9:5353", "192.0.2.1:443", "udp"),
        ("[2001:db8:ffff::7]:40000", "[2001:db8::1]:443", "tcp"),
        ("[2001:db8:ffff::8]:5353", "[2001:db8::1]:443", "udp"),
    ];
    for (src, dst, proto) in flows {
        for json in [false, true] {
            let mut args = vec!["lookup", src, dst, proto, "--config", example, "--offline"];
            if json {
                args.push("--json");
            }
            let on_x86 = output(&x86, &args)?;
            ensure!(
                !String::from_utf8_lossy(&on_x86.stderr)
                    .contains("unexpected argument '--offline'"),
                "this cdn-steer has no `lookup --offline` yet: the offline lookup (issue #10, \
                 preflight and --json) adds it; rebuild with `cargo xtask dist` once it is in"
            );
            assert!(
                on_x86.status.success() && !on_x86.stdout.is_empty(),
                "cdn-steer {}: {}",
                args.join(" "),
                transcript(&on_x86)
            );
            let on_arm = qemu(&arm, &args)?;
            assert_eq!(
                transcript(&on_arm),
                transcript(&on_x86),
                "cdn-steer {} differs between arm64 and x86-64",
                args.join(" ")
            );
        }
    }
    Ok(())
}

#[test]
fn lintian_reports_no_errors() -> Result<()> {
    let debs = [deb("amd64")?, deb("arm64")?];
    let out = Command::new("lintian")
        .args(&debs)
        .stdin(Stdio::null())
        .output()
        .context("running lintian (cargo xtask setup installs it)")?;
    let report = stdout(&out);
    println!("{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    // 2: errors found (also those it does not print), 1: lintian itself failed.
    assert!(out.status.success(), "{}", transcript(&out));
    Ok(())
}

/// Each package holds its architecture's binary, byte for byte the one `dist` built.
#[test]
fn packages_hold_their_architectures_binary() -> Result<()> {
    for (arch, triple) in [("amd64", X86_64), ("arm64", AARCH64)] {
        let dir = ScratchDir::new("pkg-extract")?;
        let deb = deb(arch)?;
        let out = output(
            Path::new("dpkg-deb"),
            &[
                "-x",
                deb.to_str().context("path")?,
                dir.path().to_str().context("path")?,
            ],
        )?;
        ensure!(out.status.success(), "{}", transcript(&out));
        let packed = fs::read(dir.path().join("usr/bin/cdn-steer"))?;
        assert!(
            packed == fs::read(dist_binary(triple)?)?,
            "{arch}: /usr/bin/cdn-steer is not target/{triple}/dist/cdn-steer"
        );
        let field = output(
            Path::new("dpkg-deb"),
            &["-f", deb.to_str().context("path")?, "Architecture"],
        )?;
        assert_eq!(stdout(&field).trim(), arch);
    }
    Ok(())
}

/// A root with its own, empty dpkg database: `dpkg --root` installs there, runs the maintainer
/// scripts outside a chroot with `$DPKG_ROOT` set (the root has no shell of its own), and logs
/// there too.
struct DpkgRoot {
    dir: ScratchDir,
}

impl DpkgRoot {
    fn new() -> Result<Self> {
        let dir = ScratchDir::new("pkg-root")?;
        let admin = dir.path().join("var/lib/dpkg");
        for sub in ["info", "updates", "triggers"] {
            fs::create_dir_all(admin.join(sub))?;
        }
        fs::write(admin.join("status"), "")?;
        Ok(Self { dir })
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    fn dpkg(&self, args: &[&str]) -> Result<String> {
        let root = self.dir.path().to_str().context("path")?;
        let log = format!("--log={root}/var/log/dpkg.log");
        let mut all = vec!["--root", root, log.as_str(), "--force-script-chrootless"];
        all.extend_from_slice(args);
        let out = output(Path::new("dpkg"), &all)?;
        ensure!(
            out.status.success(),
            "dpkg {}: {}",
            all.join(" "),
            transcript(&out)
        );
        Ok(stdout(&out))
    }

    /// dpkg's `Status:` of the package in this root.
    fn status(&self) -> Result<String> {
        let root = self.dir.path().to_str().context("path")?;
        let out = output(
            Path::new("dpkg-query"),
            &["--root", root, "-W", "-f=${Status}", "cdn-steer"],
        )?;
        Ok(stdout(&out))
    }

    /// Every file of the root outside dpkg's own database and log, relative to it, sorted.
    fn files(&self) -> Result<Vec<String>> {
        fn walk(dir: &Path, root: &Path, files: &mut Vec<String>) -> Result<()> {
            for entry in fs::read_dir(dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    walk(&path, root, files)?;
                } else {
                    files.push(path.strip_prefix(root)?.to_string_lossy().into_owned());
                }
            }
            Ok(())
        }
        let mut files = Vec::new();
        walk(self.dir.path(), self.dir.path(), &mut files)?;
        files.retain(|f| !f.starts_with("var/"));
        files.sort();
        Ok(files)
    }
}

/// The host knows nothing of cdn-steer: dpkg has no record of it and none of its files exist.
fn assert_host_untouched() -> Result<()> {
    let out = output(Path::new("dpkg"), &["-s", "cdn-steer"])?;
    ensure!(
        !out.status.success(),
        "the host's dpkg has cdn-steer installed:\n{}",
        transcript(&out)
    );
    for path in [
        "/usr/bin/cdn-steer",
        "/etc/cdn-steer",
        "/usr/lib/systemd/system/cdn-steer.service",
        "/usr/share/cdn-steer",
        "/usr/share/doc/cdn-steer",
    ] {
        ensure!(!Path::new(path).exists(), "{path} exists on the host");
    }
    Ok(())
}

const CONF: &str = "etc/cdn-steer/cdn-steer.toml";

#[test]
fn package_installs_works_removes_and_purges() -> Result<()> {
    let deb = deb("amd64")?;
    assert_host_untouched()?;
    let root = DpkgRoot::new()?;
    root.dpkg(&["--install", deb.to_str().context("path")?])?;
    assert_eq!(root.status()?, "install ok installed");

    // The installed binary checks the installed configuration, which is the example.
    let binary = root.path("usr/bin/cdn-steer");
    let conf = root.path(CONF);
    assert_eq!(
        fs::read_to_string(&conf)?,
        fs::read_to_string(example_config())?
    );
    let installed = output(&binary, &["check", "-c", conf.to_str().context("path")?])?;
    assert!(
        stdout(&installed).contains("configuration OK: node node-a"),
        "{}",
        transcript(&installed)
    );
    let from_source = output(
        &binary,
        &["check", "-c", example_config().to_str().context("path")?],
    )?;
    assert_eq!(
        installed.status,
        from_source.status,
        "{}",
        transcript(&installed)
    );

    // The unit starts the installed binary on the installed configuration.
    let unit = fs::read_to_string(root.path("usr/lib/systemd/system/cdn-steer.service"))?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("the unit has no ExecStart")?;
    assert!(
        exec.starts_with("/usr/bin/cdn-steer run")
            && exec.contains("/etc/cdn-steer/cdn-steer.toml"),
        "{exec}"
    );
    assert!(unit.contains("Type=notify"), "{unit}");

    // The BIRD snippet parses, and the man pages and bash completion are well-formed.
    let bird = root.path("usr/share/cdn-steer/bird/cdn-steer.conf");
    let parsed = output(
        Path::new("bird"),
        &["-p", "-c", bird.to_str().context("path")?],
    )?;
    assert!(parsed.status.success(), "{}", transcript(&parsed));
    for page in [
        "cdn-steer",
        "cdn-steer-run",
        "cdn-steer-check",
        "cdn-steer-lookup",
    ] {
        let page = root.path(&format!("usr/share/man/man1/{page}.1.gz"));
        let text = output(Path::new("zcat"), &[page.to_str().context("path")?])?;
        let text = stdout(&text);
        assert!(
            text.contains(".TH cdn-steer") && text.contains(".SH NAME"),
            "{}: {text}",
            page.display()
        );
    }
    let completion = root.path("usr/share/bash-completion/completions/cdn-steer");
    let syntax = output(
        Path::new("bash"),
        &["-n", completion.to_str().context("path")?],
    )?;
    assert!(syntax.status.success(), "{}", transcript(&syntax));
    for path in [
        "usr/share/zsh/vendor-completions/_cdn-steer",
        "usr/share/fish/vendor_completions.d/cdn-steer.fish",
        "usr/share/doc/cdn-steer/copyright",
        "usr/share/doc/cdn-steer/changelog.gz",
    ] {
        assert!(root.path(path).is_file(), "{path} not installed");
    }
    let conffiles = root.dpkg(&["--status", "cdn-steer"])?;
    assert!(
        conffiles.contains("Conffiles:\n /etc/cdn-steer/cdn-steer.toml "),
        "{conffiles}"
    );

    // Remove: everything goes but the operator's edited configuration.
    let edited = format!("{}# edited by the operator\n", fs::read_to_string(&conf)?);
    fs::write(&conf, &edited)?;
    root.dpkg(&["--remove", "cdn-steer"])?;
    assert_eq!(root.status()?, "deinstall ok config-files");
    assert_eq!(root.files()?, [CONF]);
    assert_eq!(fs::read_to_string(&conf)?, edited);

    // Installed again, the edit stays (the packaged file has not changed, so dpkg asks nothing).
    root.dpkg(&["--install", deb.to_str().context("path")?])?;
    assert_eq!(fs::read_to_string(&conf)?, edited);

    // Purge: nothing is left, not even the configuration's directory.
    root.dpkg(&["--purge", "cdn-steer"])?;
    assert_eq!(root.status()?, "");
    assert_eq!(root.files()?, Vec::<String>::new());
    assert!(!root.path("etc/cdn-steer").exists());

    assert_host_untouched()
}

//! `cdn-steer check` on a real host: a network namespace set up wrong in every way the
//! preflight knows (sysctls, VIPs, a down interface with a small MTU, an interface without
//! native XDP (a bridge), one that does not exist, a pin path that is a file, BIRD without one of the
//! protocols), then set right by running the fixes the check itself names. The binary runs in
//! the namespace with `ip netns exec`, as an operator would run it there.

use std::{path::Path, process::Output};

use anyhow::{Context as _, Result, bail, ensure};
use cdn_test_support::{
    BpfMount, Netns, binaries::cdn_steer, bird::Bird, process::Group, scratch::ScratchDir,
};
use cdn_user::operator::{
    check::{CheckDocument, Verdict},
    preflight::{Finding, Group as Part, Status},
};

fn bird_config(protocols: &[&str]) -> String {
    let mut c = "router id 10.1.1.2;\nprotocol device {}\n".to_owned();
    for p in protocols {
        let (family, route) = if p.ends_with('6') {
            ("ipv6", "2001:db8::1/128")
        } else {
            ("ipv4", "192.0.2.1/32")
        };
        c.push_str(&format!(
            "protocol static {p} {{ {family}; disabled; route {route} blackhole; }}\n"
        ));
    }
    c
}

fn node_config(interfaces: &[&str], bpffs: &Path, bird_socket: &Path) -> String {
    let interfaces = interfaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    // The first interface carries the steering traffic: without the list, check warns that
    // steering packets are trusted on every interface.
    let underlay = interfaces.split(", ").next().unwrap_or_default();
    format!(
        "[node]\nname = \"a\"\ninterfaces = [{interfaces}]\nunderlay_interfaces = [{underlay}]\n\
         underlay_v4 = \"10.1.1.2\"\n\
         underlay_v6 = \"fd00:1::2\"\nmax_frame = 1614\nbpffs = \"{}\"\n\n\
         [cluster]\nhash_key = \"00112233445566778899aabbccddeeff\"\n\n\
         [[cluster.members]]\nname = \"a\"\nid = 0\nunderlay = \"10.1.1.2\"\n\n\
         [[services]]\nname = \"web\"\nvips = [\"192.0.2.1/32\", \"2001:db8::1/128\"]\n\
         tcp_ports = [80]\n\n\
         [bgp]\nbird_socket = \"{}\"\nprotocols = [\"anycast_vips\", \"anycast_vips6\"]\n",
        bpffs.display(),
        bird_socket.display()
    )
}

/// `cdn-steer check --json -c <config> [extra]` inside `ns`: the document and the exit code.
fn check(ns: &Netns, config: &Path, extra: &[&str]) -> Result<(CheckDocument, i32)> {
    let out: Output = ns
        .command(&cdn_steer()?.to_string_lossy())
        .args(["check", "--json", "-c"])
        .arg(config)
        .args(extra)
        .output()?;
    let doc = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "check --json printed no document: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((doc, out.status.code().unwrap_or(-1)))
}

fn find<'a>(doc: &'a CheckDocument, part: Part, item: &str) -> Result<&'a Finding> {
    doc.host
        .findings
        .iter()
        .find(|f| f.group == part && f.item == item)
        .with_context(|| {
            format!(
                "no {part:?} finding for {item:?} in {:#?}",
                doc.host.findings
            )
        })
}

fn expect(
    doc: &CheckDocument,
    part: Part,
    item: &str,
    status: Status,
    fix: Option<&str>,
) -> Result<()> {
    let f = find(doc, part, item)?;
    ensure!(
        f.status == status && f.fix.as_deref() == fix,
        "{part:?} {item}: expected {status:?} with fix {fix:?}, got {f:#?}"
    );
    Ok(())
}

/// Every sysctl the preflight reads, set wrong.
const WRONG_SYSCTLS: &str = "sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0 \
    net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.eth0.rp_filter=2 \
    net.ipv4.conf.all.accept_local=0 net.ipv4.conf.eth0.accept_local=0 \
    net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.eth0.arp_ignore=0 \
    net.ipv4.conf.all.arp_announce=0 net.ipv4.conf.eth0.arp_announce=1";

#[test]
fn a_bad_host_is_named_and_the_named_fixes_make_it_good() -> Result<()> {
    let dir = ScratchDir::new("preflight")?;
    let ns = Netns::new("preflight")?;
    let mount = BpfMount::new(&dir.path().join("bpffs"))?;
    ns.ip_batch(
        "link add eth0 mtu 1400 type veth peer name peer0\nlink set peer0 up\n\
         link add br0 type bridge\nlink set br0 up\n",
    )?;
    ns.sh(WRONG_SYSCTLS)?;
    let not_a_dir = dir.path().join("pins-file");
    std::fs::write(&not_a_dir, "")?;
    let mut bird = Bird::start(
        &ns,
        dir.path(),
        "pf",
        &bird_config(&["anycast_vips"]),
        Group::Inherit,
    )?;

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        node_config(&["eth0", "br0", "nosuch0"], &not_a_dir, bird.socket()),
    )?;
    let (doc, code) = check(&ns, &bad, &[])?;
    ensure!(code == 2, "exit code {code}, expected 2 for host problems");
    ensure!(doc.verdict == Verdict::HostProblem && doc.config.valid && doc.host.checked);

    use Status::{Ok as Good, Problem};
    let sysctl = |key: &str, value: &str| format!("sysctl -w {key}={value}");
    for (key, want) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
        ("net.ipv4.conf.eth0.accept_local", "1"),
        ("net.ipv4.conf.eth0.arp_ignore", "1"),
        ("net.ipv4.conf.eth0.arp_announce", "2"),
    ] {
        expect(&doc, Part::Sysctl, key, Problem, Some(&sysctl(key, want)))?;
    }
    for vip in ["192.0.2.1/32", "2001:db8::1/128"] {
        expect(
            &doc,
            Part::Vips,
            vip,
            Problem,
            Some(&format!("ip addr add {vip} dev lo")),
        )?;
    }
    expect(
        &doc,
        Part::Interfaces,
        "eth0",
        Problem,
        Some("ip link set dev eth0 up"),
    )?;
    expect(&doc, Part::Interfaces, "eth0 xdp", Good, None)?;
    // A bridge is up, and has no native XDP.
    expect(&doc, Part::Interfaces, "br0", Good, None)?;
    ensure!(find(&doc, Part::Interfaces, "br0 xdp")?.status == Problem);
    ensure!(find(&doc, Part::Interfaces, "nosuch0")?.status == Problem);
    expect(
        &doc,
        Part::Mtu,
        "eth0",
        Problem,
        Some("ip link set dev eth0 mtu 1600"),
    )?;
    ensure!(find(&doc, Part::Bpffs, &not_a_dir.display().to_string())?.status == Problem);
    expect(
        &doc,
        Part::Bird,
        &bird.socket().display().to_string(),
        Good,
        None,
    )?;
    expect(&doc, Part::Bird, "protocol anycast_vips", Good, None)?;
    ensure!(find(&doc, Part::Bird, "protocol anycast_vips6")?.status == Problem);

    // The file alone is fine: --no-host says so, and that the host was not looked at.
    let (doc_file, code) = check(&ns, &bad, &["--no-host"])?;
    ensure!(code == 0 && doc_file.verdict == Verdict::Ok && !doc_file.host.checked);
    ensure!(doc_file.host.findings.is_empty() && doc_file.host.skipped.is_some());

    // Run every fix that is a command, as the check printed it.
    for fix in doc.host.findings.iter().filter_map(|f| f.fix.as_deref()) {
        if fix.starts_with("sysctl -w ") || fix.starts_with("ip ") {
            ns.sh(fix)
                .with_context(|| format!("running the fix {fix:?}"))?;
        }
    }
    drop(bird);
    bird = Bird::start(
        &ns,
        dir.path(),
        "pf2",
        &bird_config(&["anycast_vips", "anycast_vips6"]),
        Group::Inherit,
    )?;
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        node_config(&["eth0"], &mount.join("node"), bird.socket()),
    )?;
    let (doc, code) = check(&ns, &good, &[])?;
    let not_ok: Vec<&Finding> = doc
        .host
        .findings
        .iter()
        .filter(|f| f.status != Good)
        .collect();
    if code != 0 || !not_ok.is_empty() {
        bail!("after the fixes: exit code {code}, not ok: {not_ok:#?}");
    }
    ensure!(doc.verdict == Verdict::Ok);
    // Every group was looked at.
    for part in [
        Part::Sysctl,
        Part::Vips,
        Part::Interfaces,
        Part::Mtu,
        Part::Bpffs,
        Part::Bird,
    ] {
        ensure!(
            doc.host.findings.iter().any(|f| f.group == part),
            "no {part:?} finding"
        );
    }

    // The check reads the state, it does not remember: a VIP removed again is missed again,
    // a stopped BIRD is found stopped. And the interface's settings combine with `all` as in
    // the kernel: accept_local on in `all` is enough, arp_ignore takes the larger of the two,
    // rp_filter on the interface alone still filters.
    ns.ip(&["addr", "del", "2001:db8::1/128", "dev", "lo"])?;
    let bird_socket = bird.socket().display().to_string();
    drop(bird);
    ns.sh(
        "sysctl -qw net.ipv4.conf.eth0.accept_local=0 net.ipv4.conf.all.accept_local=1 \
         net.ipv4.conf.eth0.arp_ignore=0 net.ipv4.conf.all.arp_ignore=1 \
         net.ipv4.conf.eth0.rp_filter=1",
    )?;
    let (doc, code) = check(&ns, &good, &[])?;
    ensure!(code == 2);
    expect(
        &doc,
        Part::Vips,
        "2001:db8::1/128",
        Problem,
        Some("ip addr add 2001:db8::1/128 dev lo"),
    )?;
    expect(&doc, Part::Vips, "192.0.2.1/32", Good, None)?;
    ensure!(find(&doc, Part::Bird, &bird_socket)?.status == Problem);
    expect(
        &doc,
        Part::Sysctl,
        "net.ipv4.conf.eth0.accept_local",
        Good,
        None,
    )?;
    expect(
        &doc,
        Part::Sysctl,
        "net.ipv4.conf.eth0.arp_ignore",
        Good,
        None,
    )?;
    expect(
        &doc,
        Part::Sysctl,
        "net.ipv4.conf.eth0.rp_filter",
        Problem,
        Some("sysctl -w net.ipv4.conf.eth0.rp_filter=0"),
    )?;
    Ok(())
}

/// The text output says which parts ran, and the refused file's exit code is 1.
#[test]
fn text_output_names_the_parts_and_a_refused_file_exits_1() -> Result<()> {
    let dir = ScratchDir::new("preflight-text")?;
    let config = dir.path().join("c.toml");
    std::fs::write(&config, cdn_user::config::EXAMPLE)?;
    let out = std::process::Command::new(cdn_steer()?)
        .args(["check", "--no-host", "-c"])
        .arg(&config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(0), "{text}");
    ensure!(text.contains("configuration OK: node node-a"), "{text}");
    ensure!(text.contains("host: not checked (--no-host"), "{text}");

    std::fs::write(
        &config,
        cdn_user::config::EXAMPLE.replace("table_size = 65537", "table_size = 65536"),
    )?;
    let out = std::process::Command::new(cdn_steer()?)
        .args(["check", "-c"])
        .arg(&config)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "exit {:?}: {err}",
        out.status.code()
    );
    ensure!(
        err.contains("cluster.table_size: 65536 is not prime"),
        "{err}"
    );
    ensure!(
        err.contains("host: not checked (the configuration was refused)"),
        "{err}"
    );
    Ok(())
}

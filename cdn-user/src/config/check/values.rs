//! Rules about single values that are valid syntax but dangerous to run with: VIP prefixes that
//! would take in traffic that is not the service's, pin directories that `run` would mount over,
//! socket paths the kernel cannot bind, names that break URLs and log lines, frame limits no
//! real packet fits. Each function returns why the value is refused, with what to write
//! instead, or `None`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Component, Path};

use cdn_common::wire::{ENCAP_LEN_V4, ENCAP_LEN_V6};

use crate::config::Prefix;

/// Shortest VIP prefix accepted, per family. A VIP prefix is a set of destinations the data
/// plane treats as the service's: an IPv4 /8 is already 16 M addresses, more than any anycast
/// service announces (a /24 is the usual unit); anything wider can only be a mistake such as
/// `0.0.0.0/0`, which would make every packet "to a VIP". For IPv6 a /16 is the same order of
/// mistake (announcements are /48 or /32).
pub const MIN_VIP_PREFIX_V4: u8 = 8;
pub const MIN_VIP_PREFIX_V6: u8 = 16;

/// Longest control socket path: `sun_path` of `sockaddr_un` holds 108 bytes on Linux, the
/// terminating NUL included (a unit test checks this against libc).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Longest service name. Names appear in metric labels, log lines and `/table/<name>` URLs.
pub const MAX_SERVICE_NAME_LEN: usize = 64;

/// The smallest packet every IPv6 link must carry (RFC 8200): a node whose `max_frame` cannot
/// take a client packet of this size once encapsulated drops packets no sender can be asked to
/// make smaller.
pub const MIN_CLIENT_PACKET: u32 = 1280;

/// Address ranges no VIP may touch, with what they are. A VIP prefix overlapping one of them
/// would steer (or drop) packets the host needs for itself, or that never come from a client.
const RESERVED: &[(IpAddr, u8, &str)] = &[
    (
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        8,
        "\"this network\" (0.0.0.0/8)",
    ),
    (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8, "loopback"),
    (IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16, "link-local"),
    (IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)), 4, "multicast"),
    (IpAddr::V4(Ipv4Addr::BROADCAST), 32, "the broadcast address"),
    (
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        128,
        "the unspecified address",
    ),
    (IpAddr::V6(Ipv6Addr::LOCALHOST), 128, "loopback"),
    (
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
        96,
        "IPv4-mapped (never on the wire as IPv6)",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
        10,
        "link-local",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)),
        8,
        "multicast",
    ),
];

/// Why `vip` cannot be a VIP prefix: too wide, or touching a reserved range.
pub fn vip_problem(vip: &Prefix) -> Option<String> {
    let min = if vip.is_ipv4() {
        MIN_VIP_PREFIX_V4
    } else {
        MIN_VIP_PREFIX_V6
    };
    if vip.prefix_len() < min {
        return Some(format!(
            "{vip} is shorter than /{min}: a VIP prefix that wide makes packets to the \
             underlay, to this host and to everyone else look like service traffic; list the \
             service's own prefixes, /{min} or longer"
        ));
    }
    RESERVED.iter().find_map(|&(addr, len, what)| {
        // The table's entries are valid prefixes; a bad one would only skip its rule.
        let range = Prefix::new(addr, len).ok()?;
        range.overlaps(vip).then(|| {
            let verb = if range.prefix_len() <= vip.prefix_len() {
                "lies in"
            } else {
                "takes in"
            };
            format!(
                "{vip} {verb} {range}, {what}: such packets are not client traffic to a \
                 service; use a unicast prefix"
            )
        })
    })
}

/// Directories the system owns: a bpf filesystem mounted on one of them (as `run` does when no
/// bpffs is there yet) would hide what it holds.
const SYSTEM_DIRS: &[&str] = &[
    "/run/lock",
    "/run/user",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/run",
    "/var/spool",
    "/var/tmp",
];

/// Why `path` cannot be `node.bpffs`. `run` mounts a bpf filesystem on `/sys/fs/bpf` for a
/// path below it, or on the directory itself otherwise, when none is there; so the directory
/// must be one of the program's own, never one the system uses. (At run time the mount is also
/// refused on a directory that is not empty.)
pub fn bpffs_problem(path: &Path) -> Option<String> {
    if !path.is_absolute() {
        return Some(format!("{} must be an absolute path", path.display()));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Some(format!(
            "{} contains '..'; write the directory without it",
            path.display()
        ));
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    if path.starts_with(sys_bpf) {
        return None;
    }
    // Below the root, only normal components remain.
    let depth = path.components().count() - 1;
    let what = if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|fs| path.starts_with(fs))
    {
        "inside a kernel filesystem"
    } else if depth <= 1 {
        "the root or a top-level directory"
    } else if SYSTEM_DIRS.iter().any(|dir| path == Path::new(dir)) {
        "a directory the system uses"
    } else {
        return None;
    };
    Some(format!(
        "{} is {what}; `run` mounts a bpf filesystem on the pin directory when none is there, \
         which would hide what it holds: use a directory of its own, such as \
         /sys/fs/bpf/cdn-steer",
        path.display()
    ))
}

/// Why `path` cannot be bound as (or connected to as) a unix socket.
pub fn socket_path_problem(path: &Path) -> Option<String> {
    let len = path.as_os_str().len();
    (len > MAX_UNIX_SOCKET_PATH).then(|| {
        format!(
            "{} is {len} bytes long; a unix socket path holds at most {MAX_UNIX_SOCKET_PATH} \
             (sun_path): choose a shorter path",
            path.display()
        )
    })
}

/// Why `name` cannot be a service name. Names end up in `/table/<name>` URLs, metric labels and
/// log lines, where `/`, `?`, spaces or line breaks would change what is asked or written.
pub fn service_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if name.len() > MAX_SERVICE_NAME_LEN {
        return Some(format!(
            "{name:?} is {} bytes long; at most {MAX_SERVICE_NAME_LEN}",
            name.len()
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if !name.chars().all(allowed) || name == "." || name == ".." {
        return Some(format!(
            "{name:?} may only use letters, digits, '_', '.' and '-' (and is not \".\" or \
             \"..\"): the name goes into URLs, metric labels and log lines"
        ));
    }
    None
}

/// The smallest accepted `max_frame` other than 0: a [`MIN_CLIENT_PACKET`] client packet with
/// the encapsulation of the node's larger underlay family.
pub fn min_max_frame(underlay_v6: bool) -> u32 {
    let encap = if underlay_v6 {
        ENCAP_LEN_V6
    } else {
        ENCAP_LEN_V4
    };
    // ENCAP_LEN_* are a few dozen bytes.
    MIN_CLIENT_PACKET + encap as u32
}

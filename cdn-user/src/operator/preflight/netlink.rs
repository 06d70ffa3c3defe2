//! What the interface checks need from the kernel, read over netlink in the calling thread's
//! network namespace: the links (index, up, MTU, XDP attachment), the addresses of `lo`, and a
//! device's XDP features (the generic netlink `netdev` family, Linux 6.3+). One socket per
//! request: preflight asks a handful of questions once, so no state is kept between them.

use std::{collections::BTreeMap, fmt::Debug, io, net::IpAddr, os::fd::AsRawFd, time::Duration};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, Nla, NlasIterator,
    Parseable as _, ParseableParametrized,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{
    Socket,
    protocols::{NETLINK_GENERIC, NETLINK_ROUTE},
};

/// The kernel answers from memory; the timeout only keeps a bug from hanging `check`.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// How XDP is attached to a link, as `IFLA_XDP_ATTACHED` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum XdpAttachment {
    None,
    /// In the driver (native).
    Driver,
    /// In the generic path.
    Generic,
    /// Offloaded to the NIC.
    Hardware,
    /// Several at once; whether one is in the driver is `drv_prog`.
    Multiple {
        driver: bool,
    },
}

/// One link of the namespace.
#[derive(Clone, Debug)]
pub(super) struct Link {
    pub index: u32,
    /// `IFF_UP`: administratively up.
    pub up: bool,
    /// `IFF_LOWER_UP`: carrier.
    pub lower_up: bool,
    pub mtu: Option<u32>,
    pub xdp: XdpAttachment,
}

/// Every link by name, or why they could not be read.
pub(super) struct Links(pub Result<BTreeMap<String, Link>, String>);

impl Links {
    pub fn read() -> Self {
        Self(dump_links().map_err(|e| format!("cannot list the interfaces over netlink: {e}")))
    }

    pub fn get(&self, name: &str) -> Result<Option<&Link>, &str> {
        match &self.0 {
            Ok(links) => Ok(links.get(name)),
            Err(e) => Err(e),
        }
    }
}

fn dump_links() -> io::Result<BTreeMap<String, Link>> {
    let request = RouteNetlinkMessage::GetLink(LinkMessage::default());
    let mut links = BTreeMap::new();
    for message in exchange(NETLINK_ROUTE, request, NLM_F_DUMP)? {
        let RouteNetlinkMessage::NewLink(link) = message else {
            continue;
        };
        let mut name = None;
        let mut mtu = None;
        let mut xdp = XdpAttachment::None;
        for attribute in link.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::Mtu(m) => mtu = Some(m),
                LinkAttribute::Xdp(attrs) => xdp = xdp_attachment(&attrs),
                _ => {}
            }
        }
        if let Some(name) = name {
            let flags = link.header.flags;
            links.insert(
                name,
                Link {
                    index: link.header.index,
                    up: flags.contains(LinkFlags::Up),
                    lower_up: flags.contains(LinkFlags::LowerUp),
                    mtu,
                    xdp,
                },
            );
        }
    }
    Ok(links)
}

fn xdp_attachment(attrs: &[LinkXdp]) -> XdpAttachment {
    let attached = attrs.iter().find_map(|a| match a {
        LinkXdp::Attached(at) => Some(*at),
        _ => None,
    });
    match attached {
        Some(XdpAttached::Driver) => XdpAttachment::Driver,
        Some(XdpAttached::SocketBuffer) => XdpAttachment::Generic,
        Some(XdpAttached::Hardware) => XdpAttachment::Hardware,
        Some(XdpAttached::Multiple) => XdpAttachment::Multiple {
            driver: attrs
                .iter()
                .any(|a| matches!(a, LinkXdp::DrvProgId(id) if *id != 0)),
        },
        _ => XdpAttachment::None,
    }
}

/// The addresses of the link with index `index`, with their prefix lengths.
pub(super) fn addresses(index: u32) -> io::Result<Vec<(IpAddr, u8)>> {
    let request = RouteNetlinkMessage::GetAddress(AddressMessage::default());
    let mut found = Vec::new();
    for message in exchange(NETLINK_ROUTE, request, NLM_F_DUMP)? {
        let RouteNetlinkMessage::NewAddress(addr) = message else {
            continue;
        };
        if addr.header.index != index {
            continue;
        }
        // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on point-to-point links
        // and the only one IPv6 sends.
        let local = addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            found.push((ip, addr.header.prefix_len));
        }
    }
    Ok(found)
}

/// `NETDEV_XDP_ACT_BASIC`: the driver runs XDP programs natively (pass, drop, abort, tx).
pub(super) const XDP_ACT_BASIC: u64 = 1;
/// `NETDEV_XDP_ACT_REDIRECT`: and supports `XDP_REDIRECT` out of it.
pub(super) const XDP_ACT_REDIRECT: u64 = 1 << 1;

/// The `xdp-features` bit mask (`NETDEV_XDP_ACT_*`) of the device with index `ifindex`, from the
/// `netdev` generic netlink family. `Ok(None)`: the kernel predates the family (before 6.3).
pub(super) fn xdp_features(ifindex: u32) -> io::Result<Option<u64>> {
    let Some(family) = family_id(Netdev::family_name())? else {
        return Ok(None);
    };
    let request = Netdev {
        cmd: NETDEV_CMD_DEV_GET,
        attrs: vec![DefaultNla::new(
            NETDEV_A_DEV_IFINDEX,
            ifindex.to_ne_bytes().to_vec(),
        )],
    };
    let mut message = GenlMessage::from_payload(request);
    message.set_resolved_family_id(family);
    for answer in exchange(NETLINK_GENERIC, message, 0)? {
        for nla in &answer.payload.attrs {
            if nla.kind() == NETDEV_A_DEV_XDP_FEATURES {
                let mut value = vec![0; nla.value_len()];
                nla.emit_value(&mut value);
                let bytes: [u8; 8] = value.as_slice().try_into().map_err(|_| {
                    io::Error::other(format!("xdp-features of {} bytes", value.len()))
                })?;
                return Ok(Some(u64::from_ne_bytes(bytes)));
            }
        }
    }
    Err(io::Error::other(
        "the netdev family answered without xdp-features",
    ))
}

/// The id of generic netlink family `name`; `None` if the kernel has no such family.
fn family_id(name: &str) -> io::Result<Option<u16>> {
    let request = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
    });
    match exchange(NETLINK_GENERIC, request, 0) {
        Ok(answers) => Ok(answers.iter().find_map(|m| {
            m.payload.nlas.iter().find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
        })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

// The `netdev` family (`include/uapi/linux/netdev.h`): only what `xdp_features` asks.
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

/// A message of the `netdev` family: a command and its attributes, kept raw.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Netdev {
    cmd: u8,
    attrs: Vec<DefaultNla>,
}

impl GenlFamily for Netdev {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for Netdev {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Netdev {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DefaultNla::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// Sends `request` (with `NLM_F_REQUEST | flags`) on a new socket of `protocol` and returns
/// every message of the answer, up to `NLMSG_DONE` (a dump) or the single answer. The
/// kernel's refusal (`NLMSG_ERROR`) is the error.
fn exchange<T>(protocol: isize, request: T, flags: u16) -> io::Result<Vec<T>>
where
    T: NetlinkSerializable + NetlinkDeserializable + Debug,
{
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    set_recv_timeout(&socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    message.finalize();
    let mut out = vec![0; message.buffer_len()];
    message.serialize(&mut out);
    socket.send(&out, 0)?;

    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut answers = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < datagram.len() {
            let message = NetlinkMessage::<T>::deserialize(&datagram[offset..])
                .map_err(|e| io::Error::other(format!("undecodable netlink answer: {e}")))?;
            let length = message.header.length as usize;
            if length == 0 {
                return Err(io::Error::other("netlink message of length 0"));
            }
            offset += length.next_multiple_of(4);
            match message.payload {
                NetlinkPayload::InnerMessage(m) => {
                    answers.push(m);
                    if !dump {
                        return Ok(answers);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) => {
                    return Err(match e.code {
                        Some(code) => io::Error::from_raw_os_error(-code.get()),
                        None => io::Error::other("unexpected netlink acknowledgement"),
                    });
                }
                _ => {}
            }
        }
    }
}

fn set_recv_timeout(socket: &Socket) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads `size_of::<timeval>()` bytes from a timeval that lives across
    // the call, on a socket fd we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The driver of interface `name` (`ETHTOOL_GDRVINFO`, what `ethtool -i` shows), asked in the
/// calling thread's network namespace. `None` when the device does not say.
pub(super) fn driver(name: &str) -> Option<String> {
    /// `struct ethtool_drvinfo` from `linux/ethtool.h`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: an all-zero DrvInfo and ifreq are valid values (integers, byte arrays, a null
    // pointer in the union).
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: a datagram socket only used for this ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most size_of::<DrvInfo>() bytes into
    // `info`, which `request` points at and which outlives the call; the name is
    // NUL-terminated (checked shorter than IFNAMSIZ, rest zero).
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &raw mut request) };
    // SAFETY: closing the fd opened above, used nowhere else.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    let driver = String::from_utf8_lossy(&info.driver[..end]).into_owned();
    (!driver.is_empty()).then_some(driver)
}

/// The index of `lo` in the calling thread's network namespace.
pub(super) fn lo_index() -> io::Result<u32> {
    // SAFETY: if_nametoindex reads the NUL-terminated literal and nothing else.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

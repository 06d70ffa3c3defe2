//! Where a packet of a service goes: the service of its VIP, the service's port lists, the
//! flow's bucket in the table, and the request to encapsulate it. Shared by the two paths (`steer`) and QUIC
//! routing (`quic`), below both of them.

use aya_ebpf::{cty::c_void, helpers::generated::bpf_map_lookup_elem, programs::XdpContext};
use cdn_common::{
    counters::Reason,
    hash::{flow_hash_v4, flow_hash_v6},
    maps::{
        MAX_SERVICE_PORTS, NodeConfig, SERVICE_ALL_PORTS, SERVICE_PLACE_ELSEWHERE,
        SERVICE_PLACE_POP_MASK, SERVICE_PLACE_POP_SHIFT, SERVICE_TCP, SERVICE_UDP, Service,
    },
};

use crate::{
    auth::sign,
    encap::Encap,
    maps::{SERVICES_V4, SERVICES_V6, TABLE},
    packet::Frame,
    parse::Flow,
    verdict::Verdict,
    wire::proto,
};

/// Asks `process` to encapsulate as `with` says, counting `reason` if that works.
#[inline(always)]
fn encapsulate(e: &mut Encap, with: Encap, reason: Reason) -> Verdict {
    *e = with;
    Verdict::encapsulate(reason)
}

/// Does the service list this flow's protocol and port?
#[inline(always)]
pub fn serves(svc: &Service, flow: &Flow) -> bool {
    let (proto_flag, ports) = if flow.proto == proto::UDP {
        (SERVICE_UDP, &svc.udp_ports)
    } else {
        (SERVICE_TCP, &svc.tcp_ports)
    };
    if svc.flags & proto_flag == 0 {
        return false;
    }
    if svc.flags & SERVICE_ALL_PORTS != 0 {
        return true;
    }
    let port = flow.dst_port();
    port != 0 && lists_port(ports, port)
}

/// Whether `ports` holds `port`, without a loop: the verifier cannot follow a loop that walks
/// the stack by pointer, and the compiler does not always unroll one. The list is read as
/// four words of two ports each; a port matches where a 16-bit lane of `word ^ (port, port)`
/// is zero, which the usual bit trick detects for all lanes at once (exact for "any lane").
#[inline(always)]
pub fn lists_port(ports: &[u16; MAX_SERVICE_PORTS], port: u16) -> bool {
    const _: () = assert!(MAX_SERVICE_PORTS == 8, "read as four words");
    const LOW: u32 = 0x0001_0001;
    const HIGH: u32 = 0x8000_8000;
    // SAFETY: [u16; 8] and [u32; 4] have the same size and no invalid bit patterns; the list
    // sits at a 4-byte aligned offset of the 4-byte aligned `Service`.
    let words: [u32; 4] = unsafe { core::ptr::read(ports.as_ptr().cast::<[u32; 4]>()) };
    let both = port as u32 * LOW;
    let zero_lane = |w: u32| {
        let x = w ^ both;
        x.wrapping_sub(LOW) & !x & HIGH
    };
    zero_lane(words[0]) | zero_lane(words[1]) | zero_lane(words[2]) | zero_lane(words[3]) != 0
}

#[inline(always)]
pub fn flow_hash(cfg: &NodeConfig, frame: &Frame, flow: &Flow) -> Result<u64, Reason> {
    if flow.v6 {
        let src = frame
            .read::<[u64; 2]>(flow.src_off)
            .ok_or(Reason::Malformed)?;
        let dst = frame
            .read::<[u64; 2]>(flow.dst_off)
            .ok_or(Reason::Malformed)?;
        Ok(flow_hash_v6(
            &cfg.hash_key,
            src,
            dst,
            flow.ports,
            flow.proto,
        ))
    } else {
        let src = frame.read::<u32>(flow.src_off).ok_or(Reason::Malformed)?;
        let dst = frame.read::<u32>(flow.dst_off).ok_or(Reason::Malformed)?;
        Ok(flow_hash_v4(
            &cfg.hash_key,
            src,
            dst,
            flow.ports,
            flow.proto,
        ))
    }
}

/// The flow's hash and its bucket's hops in this node's table.
#[inline(always)]
pub fn bucket_of(
    cfg: &NodeConfig,
    frame: &Frame,
    flow: &Flow,
    svc: &Service,
) -> Result<(u64, [u16; 3]), Reason> {
    bucket_in(cfg, frame, flow, svc, svc.table_offset)
}

/// The flow's hash and its bucket's hops in the table that places new connections
/// ([`new_flow_table`]).
#[inline(always)]
pub fn new_flow_bucket_of(
    cfg: &NodeConfig,
    frame: &Frame,
    flow: &Flow,
    svc: &Service,
) -> Result<(u64, [u16; 3]), Reason> {
    bucket_in(cfg, frame, flow, svc, new_flow_table(svc))
}

/// The flow's hash and its bucket's hops in the table whose bucket 0 is `table`.
#[inline(always)]
fn bucket_in(
    cfg: &NodeConfig,
    frame: &Frame,
    flow: &Flow,
    svc: &Service,
    table: u32,
) -> Result<(u64, [u16; 3]), Reason> {
    if svc.table_size == 0 {
        return Err(Reason::NoRoute);
    }
    let hash = flow_hash(cfg, frame, flow)?;
    Ok((hash, hops_in(svc, table, hash)?))
}

/// The hops of the bucket of a flow with hash `hash` in this node's table.
#[inline(always)]
pub fn hops_of(svc: &Service, hash: u64) -> Result<[u16; 3], Reason> {
    hops_in(svc, svc.table_offset, hash)
}

/// The hops of the bucket of a flow with hash `hash` in the table whose bucket 0 is `offset`.
#[inline(always)]
pub fn hops_in(svc: &Service, offset: u32, hash: u64) -> Result<[u16; 3], Reason> {
    let bucket = hash
        .checked_rem(svc.table_size as u64)
        .ok_or(Reason::NoRoute)?;
    let index = offset.wrapping_add(bucket as u32);
    Ok(TABLE.get(index).ok_or(Reason::NoRoute)?.hops)
}

/// Bucket 0 of the table that places new connections: this node's own PoP's, unless the
/// controller found no member there that may take them and named another PoP's
/// (`SERVICE_PLACE_ELSEWHERE`, README "PoPs", Fallback).
#[inline(always)]
pub fn new_flow_table(svc: &Service) -> u32 {
    if svc.flags & SERVICE_PLACE_ELSEWHERE == 0 {
        return svc.table_offset;
    }
    // Masked to a valid index of the 8 PoP tables; the verifier sees the bound.
    let pop = (svc.flags >> SERVICE_PLACE_POP_SHIFT) & SERVICE_PLACE_POP_MASK;
    svc.pop_tables[pop as usize]
}

/// `encapsulate`, with the MAC the header will carry if `steer_auth` is on.
#[inline(always)]
pub fn signed(
    ctx: &XdpContext,
    cfg: &NodeConfig,
    flow: &Flow,
    out: &mut Encap,
    e: Encap,
    reason: Reason,
) -> Result<Verdict, Reason> {
    let verdict = encapsulate(out, e, reason);
    sign(ctx, cfg, flow, out)?;
    Ok(verdict)
}

/// LPM trie key with the layout the kernel expects (prefix length, then the address), aligned
/// so that it is built with word stores: the verifier rejects misaligned stack access.
#[repr(C, align(8))]
struct LpmKey<A> {
    prefix_len: u32,
    addr: A,
}

/// The service whose VIP prefix holds the address at `addr_off`: the map's own value, read in
/// place rather than copied to the stack (it stays valid while the program runs: RCU).
#[inline(always)]
pub fn service(frame: &Frame, addr_off: usize, v6: bool) -> Option<&'static Service> {
    let value = if v6 {
        let key = LpmKey {
            prefix_len: 128,
            addr: frame.read::<[u32; 4]>(addr_off)?,
        };
        lookup(
            &SERVICES_V6 as *const _ as *mut c_void,
            &key as *const _ as *const c_void,
        )
    } else {
        let key = LpmKey {
            prefix_len: 32,
            addr: frame.read::<u32>(addr_off)?,
        };
        lookup(
            &SERVICES_V4 as *const _ as *mut c_void,
            &key as *const _ as *const c_void,
        )
    };
    // SAFETY: a non-NULL result points at a `Service` value of the trie, which the kernel
    // keeps alive until the program returns; the controller replaces values, never edits them
    // in place (see `DataPlane::set_service`).
    (!value.is_null()).then(|| unsafe { &*value.cast::<Service>() })
}

/// Map lookup with a key we laid out ourselves (aya's `lpm_trie::Key` is packed, which makes
/// the compiler build it byte by byte).
#[inline(always)]
fn lookup(map: *mut c_void, key: *const c_void) -> *mut c_void {
    // SAFETY: `map` is one of our map definitions (aya's map types are transparent wrappers
    // of the definition the loader relocates), `key` points at a key of the map's key size.
    unsafe { bpf_map_lookup_elem(map, key) }
}

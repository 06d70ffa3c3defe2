//! Where a table lives in `TABLE`, and the LPM value that points the data plane at a service's
//! tables.

use cdn_common::maps::{
    MAX_POPS, MAX_SERVICE_PORTS, SERVICE_PLACE_ELSEWHERE, SERVICE_PLACE_POP_MASK,
    SERVICE_PLACE_POP_SHIFT, SERVICE_QUIC, SERVICE_TCP, SERVICE_UDP, SERVICE_UDP_LOCAL,
    SERVICE_UDP_OWNER, Service,
};

use crate::config::{ServiceSettings, UdpMode};

/// Bucket 0 of half `half` of slot `slot`.
pub(super) fn half_offset(slot: u32, half: u32, size: u32) -> u32 {
    (2 * slot + half) * size
}

/// The PoP tables of one service as the LPM entry points at them: by PoP index, the offset of
/// each one's active half.
pub(super) struct PopOffsets<'a> {
    /// Active half of each PoP's table, by PoP index (one entry without PoPs).
    pub(super) active: &'a [u32],
    /// This node's PoP index.
    pub(super) own: usize,
    /// The PoP whose table places new connections landing here, when it is not `own` (our
    /// PoP has no eligible member): see `SERVICE_PLACE_ELSEWHERE`.
    pub(super) fallback: Option<usize>,
}

/// The LPM value of `svc`: `table_offset` is this node's own PoP's table, `pop_tables` every
/// PoP's, `search_pops` every PoP but our own (none with a single PoP), and the flags name
/// the PoP that places new connections if that is not ours.
pub(super) fn service_entry(
    svc: &ServiceSettings,
    pops: &PopOffsets<'_>,
    size: u32,
    generation: u32,
) -> Service {
    let mut tcp_ports = [0u16; MAX_SERVICE_PORTS];
    let mut udp_ports = [0u16; MAX_SERVICE_PORTS];
    for (slot, port) in tcp_ports.iter_mut().zip(&svc.tcp_ports) {
        *slot = *port;
    }
    for (slot, port) in udp_ports.iter_mut().zip(&svc.udp_ports) {
        *slot = *port;
    }
    let mut flags = 0;
    if !svc.tcp_ports.is_empty() {
        flags |= SERVICE_TCP;
    }
    if !svc.udp_ports.is_empty() {
        flags |= SERVICE_UDP;
    }
    flags |= match svc.udp_mode {
        UdpMode::Owner => SERVICE_UDP_OWNER,
        UdpMode::Local => SERVICE_UDP_LOCAL,
        UdpMode::Connected => 0,
    };
    let mut pop_tables = [0u32; MAX_POPS];
    for (slot, offset) in pop_tables.iter_mut().zip(pops.active) {
        *slot = *offset;
    }
    let count = pops.active.len().min(MAX_POPS);
    // Bits of every PoP, then our own taken out; the config allows at most MAX_POPS (8).
    let all = if count > 1 { (1u16 << count) - 1 } else { 0 };
    let search_pops = u8::try_from(all & !(1u16 << pops.own)).unwrap_or(0);
    let mut service = Service {
        table_offset: pops.active.get(pops.own).copied().unwrap_or(0),
        table_size: size,
        flags,
        tcp_ports,
        udp_ports,
        generation,
        search_pops,
        pop_tables,
        ..Service::default()
    };
    if let Some(pop) = pops.fallback.filter(|p| *p != pops.own && *p < count) {
        // `count` is at most MAX_POPS, so the index fits the mask.
        service.flags |= SERVICE_PLACE_ELSEWHERE
            | (pop as u32 & SERVICE_PLACE_POP_MASK) << SERVICE_PLACE_POP_SHIFT;
    }
    if let Some(quic) = &svc.quic {
        service.flags |= SERVICE_QUIC;
        for (slot, port) in service.quic_ports.iter_mut().zip(&quic.ports) {
            *slot = *port;
        }
        service.quic_config_id = quic.config_id;
        service.quic_server_id_len = quic.server_id_len;
        service.quic_cid_len = quic.cid_len;
    }
    service
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceSettings {
        ServiceSettings {
            name: "web".into(),
            vips: Vec::new(),
            tcp_ports: vec![80],
            udp_ports: Vec::new(),
            udp_mode: UdpMode::Owner,
            quic: None,
        }
    }

    #[test]
    fn one_pop_searches_nothing_and_lists_its_own_table() {
        let e = service_entry(
            &svc(),
            &PopOffsets {
                active: &[300],
                own: 0,
                fallback: None,
            },
            100,
            4,
        );
        assert_eq!(e.table_offset, 300);
        assert_eq!(e.pop_tables, [300, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(e.search_pops, 0);
    }

    #[test]
    fn every_other_pop_is_searched() {
        let active = [0, 300, 500];
        let e = service_entry(
            &svc(),
            &PopOffsets {
                active: &active,
                own: 1,
                fallback: None,
            },
            100,
            1,
        );
        assert_eq!(e.table_offset, 300);
        assert_eq!(&e.pop_tables[..3], &active);
        assert_eq!(e.search_pops, 0b101);
        let all: Vec<u32> = (0..8).map(|i| i * 200).collect();
        let e = service_entry(
            &svc(),
            &PopOffsets {
                active: &all,
                own: 7,
                fallback: None,
            },
            100,
            1,
        );
        assert_eq!(e.search_pops, 0x7f);
        assert_eq!(e.flags & SERVICE_PLACE_ELSEWHERE, 0);
    }

    #[test]
    fn a_fallback_pop_is_named_in_the_flags_and_the_search_is_unchanged() {
        let active = [0, 300, 500];
        let e = service_entry(
            &svc(),
            &PopOffsets {
                active: &active,
                own: 1,
                fallback: Some(2),
            },
            100,
            1,
        );
        assert_eq!(e.table_offset, 300);
        assert_eq!(e.search_pops, 0b101);
        assert_eq!(
            e.flags & !(SERVICE_TCP | SERVICE_UDP_OWNER),
            SERVICE_PLACE_ELSEWHERE | 2 << SERVICE_PLACE_POP_SHIFT
        );
        // Our own PoP, or one that does not exist, is no fallback.
        for fallback in [Some(1), Some(3)] {
            let e = service_entry(
                &svc(),
                &PopOffsets {
                    active: &active,
                    own: 1,
                    fallback,
                },
                100,
                1,
            );
            assert_eq!(e.flags & SERVICE_PLACE_ELSEWHERE, 0);
        }
    }
}

//! Members in the program's maps: each member's underlay address (both directions, so that a
//! steering packet's sender can be vouched for) and its next hop, the outer headers the program
//! writes in front of the packets it sends there.

use std::net::IpAddr;

use aya::maps::MapError;
use cdn_common::maps::{
    self as m, FAMILY_NONE, FAMILY_V4, FAMILY_V6, Link, MAX_MEMBERS, Member, MemberAddr, NextHop,
    Underlay,
};

use super::program::{DataPlane, DataPlaneError, Result, map_err};

impl DataPlane {
    pub(super) fn check_id(id: u16) -> Result<()> {
        if u32::from(id) >= MAX_MEMBERS {
            return Err(DataPlaneError::MemberId(id));
        }
        Ok(())
    }

    /// Sets (or with `None` clears) a member's underlay address, in both directions.
    pub fn set_member(&mut self, id: u16, addr: Option<IpAddr>) -> Result<()> {
        Self::check_id(id)?;
        // Forget the old address first, so a stale reverse entry never vouches for anybody.
        let old = self
            .members
            .get(&u32::from(id), 0)
            .map_err(map_err(m::MAP_MEMBERS))?;
        if let Some(key) = member_addr_key(&old) {
            match self.member_addrs.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(m::MAP_MEMBER_ADDRS)(e)),
            }
        }
        let member = match addr {
            None => Member::default(),
            Some(IpAddr::V4(a)) => {
                let mut addr = [0; 16];
                addr[..4].copy_from_slice(&a.octets());
                Member {
                    addr,
                    family: FAMILY_V4,
                    _pad: [0; 3],
                }
            }
            Some(IpAddr::V6(a)) => Member {
                addr: a.octets(),
                family: FAMILY_V6,
                _pad: [0; 3],
            },
        };
        if member != old {
            // The template holds the old address, and its MACs were resolved for it: the FIB
            // decides until the controller resolves the new address.
            self.clear_next_hop(id)?;
        }
        self.members
            .set(u32::from(id), member, 0)
            .map_err(map_err(m::MAP_MEMBERS))?;
        if let Some(key) = member_addr_key(&member) {
            self.member_addrs
                .insert(key, id, 0)
                .map_err(map_err(m::MAP_MEMBER_ADDRS))?;
        }
        Ok(())
    }

    pub fn member(&self, id: u16) -> Result<Member> {
        Self::check_id(id)?;
        self.members
            .get(&u32::from(id), 0)
            .map_err(map_err(m::MAP_MEMBERS))
    }

    /// Makes `link` member `id`'s next hop: the program sends its packets out of
    /// `link.ifindex` with headers precomputed from the member's address and this node's
    /// configuration as the maps hold them now (so write both first). Returns whether the
    /// entry is valid: without a member address, or without an underlay address of its
    /// family here, it is left invalid and the program's fallback decides. Writes only what
    /// changed, so the program never sees an entry being rewritten with the same value.
    pub fn set_next_hop(&mut self, id: u16, link: &Link) -> Result<bool> {
        Self::check_id(id)?;
        // Kept to rebuild the entry when the configuration or the member's address changes.
        self.links.insert(id, *link);
        let hop = match self.underlay(id)? {
            Some(underlay) => NextHop::new(link, &underlay, self.config()?.steer_port),
            None => NextHop::INVALID,
        };
        self.write_next_hop(id, &hop)?;
        Ok(hop.is_valid())
    }

    /// Invalidates member `id`'s next hop: its packets take `bpf_fib_lookup` (or the kernel)
    /// until a next hop is set again.
    pub fn clear_next_hop(&mut self, id: u16) -> Result<()> {
        Self::check_id(id)?;
        self.links.remove(&id);
        self.write_next_hop(id, &NextHop::INVALID)
    }

    fn write_next_hop(&mut self, id: u16, hop: &NextHop) -> Result<()> {
        let current = self.next_hop(id)?;
        // Invalid entries are all alike to the program.
        if current == *hop || (!current.is_valid() && !hop.is_valid()) {
            return Ok(());
        }
        self.next_hops
            .set(u32::from(id), hop, 0)
            .map_err(map_err(m::MAP_NEXT_HOPS))
    }

    /// Member `id`'s next-hop entry as the program sees it.
    pub fn next_hop(&self, id: u16) -> Result<NextHop> {
        Self::check_id(id)?;
        self.next_hops
            .get(&u32::from(id), 0)
            .map_err(map_err(m::MAP_NEXT_HOPS))
    }

    /// Outer addresses towards member `id`, if it has an address and this node one of the
    /// same family (the program's fallback drops such packets as `NoRoute`).
    fn underlay(&self, id: u16) -> Result<Option<Underlay>> {
        let member = self.member(id)?;
        let cfg = self.config()?;
        Ok(match member.family {
            FAMILY_V4 if cfg.underlay_v4 != [0; 4] => {
                let mut dst = [0; 4];
                dst.copy_from_slice(&member.addr[..4]);
                Some(Underlay::V4 {
                    src: cfg.underlay_v4,
                    dst,
                })
            }
            FAMILY_V6 if cfg.underlay_v6 != [0; 16] => Some(Underlay::V6 {
                src: cfg.underlay_v6,
                dst: member.addr,
            }),
            _ => None,
        })
    }
}

fn member_addr_key(member: &Member) -> Option<MemberAddr> {
    match member.family {
        FAMILY_V4 => Some(MemberAddr::v4([
            member.addr[0],
            member.addr[1],
            member.addr[2],
            member.addr[3],
        ])),
        FAMILY_V6 => Some(MemberAddr::v6(member.addr)),
        FAMILY_NONE => None,
        _ => None,
    }
}

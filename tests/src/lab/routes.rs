//! Route changes at the router (or, with border routers, at the PoPs' borders) and what the
//! router's routes to the VIPs currently go over.

use std::time::Duration;

use anyhow::{Context as _, Result};

use super::{Lab, VIP_V4, VIP_V6};

impl Lab {
    /// `birdc` on the router.
    pub fn router_birdc(&self, command: &str) -> Result<String> {
        self.router_bird
            .as_ref()
            .context("the router's BIRD is not running")?
            .birdc(command)
    }

    /// Withdraws node `i`'s routes at the router (its BGP sessions go down); with border
    /// routers at its PoP's border, a shift inside the PoP.
    pub fn withdraw_at_router(&self, i: usize) -> Result<()> {
        let n = self.nodes[i].index;
        if let (Some(p), true) = (self.pop_of(i), self.has_borders()) {
            return self.border_sessions(p, &[format!("n{n}"), format!("n{n}v6")], false);
        }
        self.router_birdc(&format!("disable n{n}"))?;
        self.router_birdc(&format!("disable n{n}v6"))?;
        Ok(())
    }

    /// Brings node `i`'s BGP sessions at the router back.
    pub fn restore_at_router(&self, i: usize) -> Result<()> {
        let n = self.nodes[i].index;
        if let (Some(p), true) = (self.pop_of(i), self.has_borders()) {
            return self.border_sessions(p, &[format!("n{n}"), format!("n{n}v6")], true);
        }
        self.router_birdc(&format!("enable n{n}"))?;
        self.router_birdc(&format!("enable n{n}v6"))?;
        Ok(())
    }

    /// The nodes (indices into `nodes`) the router's route to `vip` currently uses.
    pub fn route_nodes(&self, vip: &str) -> Result<Vec<usize>> {
        if self.has_borders() {
            return self.border_route_nodes(vip);
        }
        let v6 = vip.contains(':');
        let out = self
            .router
            .ip(&[if v6 { "-6" } else { "-4" }, "route", "show", vip])?;
        let mut nodes = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let via = if v6 {
                &node.underlay_v6
            } else {
                &node.underlay
            };
            if out.contains(&format!("via {via} ")) || out.contains(&format!("via inet6 {via} ")) {
                nodes.push(i);
            }
        }
        Ok(nodes)
    }

    /// Waits until the router's routes to both VIPs go over `count` nodes.
    pub fn wait_for_routes(&self, count: usize, limit: Duration) -> Result<()> {
        self.wait_until(limit, &format!("an ECMP route over {count} nodes"), || {
            Ok(
                self.route_nodes(VIP_V4)?.len() == count
                    && self.route_nodes(VIP_V6)?.len() == count,
            )
        })
    }

    /// Withdraws and restores each node's routes at the router in turn, `rounds` times, each
    /// time waiting until the router's routes follow. Returns `rounds`.
    pub fn shift_routes(&self, rounds: usize) -> Result<usize> {
        let n = self.nodes.len();
        for k in 0..rounds {
            let i = k % n;
            self.withdraw_at_router(i)?;
            self.wait_for_routes(n - 1, Duration::from_secs(10))?;
            std::thread::sleep(Duration::from_millis(700));
            self.restore_at_router(i)?;
            self.wait_for_routes(n, Duration::from_secs(15))?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(rounds)
    }
}

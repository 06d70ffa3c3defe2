//! The QUIC rules: each service's `quic` table, and the members' server IDs, which every QUIC
//! service's connection IDs must be able to carry.

use std::collections::HashMap;

use cdn_common::quic_lb::{QUIC_SERVER_IDS, QuicLbError};

use super::Checker;
use crate::config::schema::{Config, QuicSettings, ServiceSettings};

impl Checker<'_> {
    pub(super) fn quic(&mut self, config: &Config) {
        for (s, service) in config.services.iter().enumerate() {
            if let Some(quic) = &service.quic {
                self.quic_service(&format!("services[{s}].quic"), service, quic);
            }
        }
        self.server_ids(config);
    }

    fn quic_service(&mut self, at: &str, service: &ServiceSettings, quic: &QuicSettings) {
        if quic.ports.is_empty() {
            self.problem(
                format!("{at}.ports"),
                "at least one port is required (leave out the quic table for no QUIC routing)",
            );
        }
        for (k, &port) in quic.ports.iter().enumerate() {
            let field = format!("{at}.ports[{k}]");
            if let Some(j) = quic.ports[..k].iter().position(|&p| p == port) {
                self.problem(field, format!("duplicate port {port} (also [{j}])"));
            } else if !service.udp_ports.contains(&port) {
                self.problem(
                    field,
                    format!(
                        "{port} is not one of the service's udp_ports; QUIC runs over UDP, add \
                         it there too"
                    ),
                );
            }
        }
        if let Err(e) = quic.lb().validate() {
            let key = match e {
                QuicLbError::ConfigId(_) => "config_id",
                QuicLbError::ServerIdLen(_) => "server_id_len",
                QuicLbError::CidLen(_) | QuicLbError::ServerId(_) => "cid_len",
            };
            self.problem(format!("{at}.{key}"), e.to_string());
        }
    }

    /// Server IDs are unique, and fit the smallest `server_id_len` among the QUIC services
    /// (with no QUIC service, the map's index range).
    fn server_ids(&mut self, config: &Config) {
        let smallest = config
            .services
            .iter()
            .enumerate()
            .filter_map(|(s, svc)| svc.quic.as_ref().map(|q| (s, q.lb())))
            .filter(|(_, lb)| lb.validate().is_ok())
            .min_by_key(|(_, lb)| lb.server_id_len);
        let mut seen: HashMap<u32, usize> = HashMap::new();
        for (i, m) in config.cluster.members.iter().enumerate() {
            let field = format!("cluster.members[{i}].quic_server_id");
            let id = m.quic_server_id;
            let written = if id == u32::from(m.id) {
                format!("{id} (the member's id, the default)")
            } else {
                id.to_string()
            };
            match smallest {
                Some((s, lb)) if id > lb.max_server_id() => self.problem(
                    field.as_str(),
                    format!(
                        "{written} does not fit services[{s}].quic.server_id_len = {} (at most \
                         {}); set a smaller quic_server_id or a longer server_id_len",
                        lb.server_id_len,
                        lb.max_server_id()
                    ),
                ),
                None if id >= QUIC_SERVER_IDS => self.problem(
                    field.as_str(),
                    format!(
                        "{written} is above the largest server ID, {}",
                        QUIC_SERVER_IDS - 1
                    ),
                ),
                _ => {}
            }
            // Two members with the same id and default server IDs: the id's problem says it.
            let both_default = |j: usize| {
                let other = &config.cluster.members[j];
                other.id == m.id && id == u32::from(m.id)
            };
            if let Some(&j) = seen.get(&id) {
                if both_default(j) {
                    continue;
                }
                self.problem(
                    field,
                    format!(
                        "duplicate server ID {id} (also cluster.members[{j}]); each member's \
                         QUIC connection IDs must name it alone"
                    ),
                );
            } else {
                seen.insert(id, i);
            }
        }
    }
}

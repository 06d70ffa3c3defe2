//! BIRD: its control socket answers, and the static protocols that hold the VIP routes
//! (`bgp.protocols`) exist there. Asked with the daemon's own client (`bgp::bird`), so what
//! passes here is what the announcer will find.

use super::{Finding, Group};
use crate::{
    bgp::bird::{BirdClient, BirdError},
    config::Config,
};

pub(super) fn check(cfg: &Config) -> Vec<Finding> {
    let Some(bgp) = &cfg.bgp else {
        return vec![Finding::ok(
            Group::Bird,
            "[bgp]",
            "not configured: cdn-steer announces nothing",
        )];
    };
    if !bgp.enabled {
        return vec![Finding::ok(
            Group::Bird,
            "[bgp]",
            "enabled = false: cdn-steer announces nothing",
        )];
    }
    let client = BirdClient::from_settings(bgp);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return vec![Finding::warning(
                Group::Bird,
                "[bgp]",
                format!("cannot start the async runtime to ask BIRD: {e}"),
                None,
            )];
        }
    };
    let socket = bgp.bird_socket.display().to_string();
    let mut out = Vec::new();
    let answers = runtime.block_on(async {
        let mut answers = Vec::new();
        for name in &bgp.protocols {
            answers.push((name, client.protocol(name).await));
        }
        answers
    });
    if let Some((_, Err(e))) = answers
        .iter()
        .find(|(_, a)| a.as_ref().is_err_and(BirdError::is_unreachable))
    {
        out.push(Finding::problem(
            Group::Bird,
            socket,
            e.to_string(),
            Some("start BIRD, or set bgp.bird_socket to its control socket (bird -s)".to_owned()),
        ));
        return out;
    }
    out.push(Finding::ok(Group::Bird, socket, "BIRD answers"));
    for (name, answer) in answers {
        let item = format!("protocol {name}");
        out.push(match answer {
            Ok(status) if status.proto == "Static" => Finding::ok(
                Group::Bird,
                item,
                format!("static, {} ({})", status.state, status.table),
            ),
            Ok(status) => Finding::warning(
                Group::Bird,
                item,
                format!(
                    "a {} protocol: cdn-steer enables and disables it as if it held the VIP \
                     routes, which a static protocol does",
                    status.proto
                ),
                Some(static_protocol(name)),
            ),
            Err(BirdError::NoSuchProtocol(_)) => Finding::problem(
                Group::Bird,
                item,
                "BIRD has no such protocol: the VIPs would never be announced",
                Some(static_protocol(name)),
            ),
            Err(e) => Finding::problem(Group::Bird, item, e.to_string(), None),
        });
    }
    out
}

fn static_protocol(name: &str) -> String {
    format!(
        "add `protocol static {name} {{ ipv4; disabled; route <VIP> blackhole; }}` (ipv6 and \
         IPv6 VIPs for that family) to BIRD's configuration, then `birdc configure` (README, \
         \"BIRD\")"
    )
}

//! `cdn-steer`: the anycast steering controller and its command-line interface.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use cdn_user::{
    config, daemon,
    operator::{
        cli,
        control::{self, Request, Response, StatusReport, TraceSpec},
    },
};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cdn-steer",
    version,
    about = "XDP anycast steering: keeps every flow on the server that owns it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: load and attach the data plane, keep its tables, health-check the
    /// members, announce the VIPs, serve metrics.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Leave the data plane attached when stopping (it keeps forwarding with the last
        /// tables until a controller starts again).
        #[arg(long)]
        keep_attached: bool,
        /// Forget pinned maps and links left by a previous run (loses the hop history).
        #[arg(long)]
        reset_maps: bool,
        /// Milliseconds between withdrawing the routes and detaching, when stopping.
        #[arg(long, default_value_t = 1000)]
        shutdown_grace_ms: u64,
    },
    /// Validate a configuration and show the table it would build.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the running daemon's state.
    Status {
        /// Configuration of the daemon (for its control socket path).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop taking new connections on this node and withdraw its routes; flows continue.
    Drain {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Take new connections again.
    Undrain {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show which member owns a flow, with the data plane's hash and the live table.
    Lookup {
        /// Client address and port, e.g. 198.51.100.7:40000 or [2001:db8::7]:40000.
        src: SocketAddr,
        /// VIP and port, e.g. 192.0.2.1:443.
        dst: SocketAddr,
        #[arg(value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Stream the data plane's decisions on this node live: flow, reason and action, member
    /// and hop, interface. Runs until Ctrl-C or --count; one trace at a time per node.
    Trace {
        /// Only flows to this address (the VIP).
        #[arg(long)]
        vip: Option<std::net::IpAddr>,
        /// Only flows from this address (the client).
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        /// Only flows to this port (the VIP side).
        #[arg(long)]
        port: Option<u16>,
        /// Only packets with this verdict reason (as in the metrics, e.g. port_miss); repeat
        /// for several.
        #[arg(long = "reason")]
        reasons: Vec<String>,
        /// Stop after this many packets.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object a line instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A client command piped into `head` should end quietly when the pipe closes, like any
        // Unix tool, instead of panicking on the failed write. (The daemon keeps Rust's default,
        // SIGPIPE ignored, so a closed socket is an error to handle, not the end of it.)
        // SAFETY: setting a signal disposition to its default is always sound.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cdn-steer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn ask(config: Option<PathBuf>, request: Request) -> Result<Response> {
    let socket = cli::control_socket_of(config.as_deref())?;
    let response = control::call(&socket, &request, Duration::from_secs(10)).await?;
    if let Response::Error { message } = &response {
        bail!("{message}");
    }
    Ok(response)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            keep_attached,
            reset_maps,
            shutdown_grace_ms,
        } => runtime()?.block_on(daemon::run(daemon::Options {
            config_path: config,
            detach_on_exit: !keep_attached,
            reset_maps,
            shutdown_grace: Duration::from_millis(shutdown_grace_ms),
        })),
        Command::Check { config } => {
            let cfg = config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            print!("{}", cli::check_summary(&cfg)?);
            Ok(())
        }
        Command::Status { config, json } => {
            let response = runtime()?.block_on(ask(config, Request::Status))?;
            let Response::Status(status) = response else {
                bail!("unexpected answer from the daemon");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Drain { config } => done(runtime()?.block_on(ask(config, Request::Drain))?),
        Command::Undrain { config } => done(runtime()?.block_on(ask(config, Request::Undrain))?),
        Command::Lookup {
            src,
            dst,
            proto,
            config,
        } => {
            let udp = matches!(proto, Proto::Udp);
            let response = runtime()?.block_on(ask(config, Request::Lookup { src, dst, udp }))?;
            let Response::Lookup(r) = response else {
                bail!("unexpected answer from the daemon");
            };
            println!(
                "{src} -> {dst} {}: service {}, hash {:#018x}, bucket {} (table generation {})",
                if udp { "udp" } else { "tcp" },
                r.service,
                r.hash,
                r.bucket,
                r.table_generation
            );
            match r.hops.split_first() {
                None => println!("no owner: the bucket is empty"),
                Some(((id, name), rest)) => {
                    println!("owner: {name} (id {id})");
                    for (i, (id, name)) in rest.iter().enumerate() {
                        println!("previous owner {}: {name} (id {id})", i + 1);
                    }
                }
            }
            println!("accepted by: {}", r.accepted_by);
            Ok(())
        }
        Command::Trace {
            vip,
            client,
            port,
            reasons,
            count,
            json,
            config,
        } => {
            let spec = TraceSpec {
                vip,
                client,
                port,
                reasons,
                count,
            };
            runtime()?.block_on(trace(config, spec, json))
        }
    }
}

/// `cdn-steer trace`: prints every response line until the daemon ends the trace.
async fn trace(config: Option<PathBuf>, spec: TraceSpec, json: bool) -> Result<()> {
    use std::io::Write as _;
    let socket = cli::control_socket_of(config.as_deref())?;
    let mut responses = control::stream(&socket, &Request::Trace(spec)).await?;
    let mut out = std::io::stdout().lock();
    while let Some(response) = responses.next().await? {
        if json {
            writeln!(out, "{}", serde_json::to_string(&response)?)?;
        }
        match response {
            Response::Trace(record) if !json => writeln!(out, "{record}")?,
            Response::TraceLost { lost } if !json => writeln!(
                out,
                "-- {lost} events lost so far: the ring buffer was full"
            )?,
            Response::TraceEnd {
                events,
                lost,
                reason,
            } => {
                if !json {
                    writeln!(out, "-- {events} events, {lost} lost: {reason}")?;
                }
                return Ok(());
            }
            Response::Error { message } => bail!("{message}"),
            _ => {}
        }
        // Line by line, so that a reader (or a pipe into grep) sees each packet at once.
        out.flush()?;
    }
    bail!("the daemon closed the trace without ending it")
}

fn done(response: Response) -> Result<()> {
    match response {
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        _ => bail!("unexpected answer from the daemon"),
    }
}

fn print_status(s: &StatusReport) {
    println!("node {} ({})", s.node, s.config_path);
    for a in &s.attachments {
        println!(
            "  XDP on {} in {} mode{}",
            a.interface,
            a.mode,
            if a.replaced {
                " (taken over from a previous run)"
            } else {
                ""
            }
        );
    }
    println!(
        "  state: {}{}",
        if s.ready { "ready" } else { "not ready" },
        if s.draining { ", DRAINING" } else { "" }
    );
    for b in &s.bgp {
        println!(
            "  BGP: protocol {} {}, BIRD {}{}",
            b.protocol,
            match b.announced {
                Some(true) => "announced",
                Some(false) => "withdrawn",
                None => "unknown",
            },
            if b.bird_reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            },
            b.last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
    }
    println!(
        "  reloads: {} ok, {} refused",
        s.reloads_ok, s.reloads_failed
    );
    println!("services ({} buckets per table):", s.table_size);
    for svc in &s.services {
        println!(
            "  {:<16} generation {:<6} slot {} half {}  udp {:<9}  {}",
            svc.name,
            svc.generation,
            svc.slot,
            svc.active_half,
            svc.udp_mode,
            svc.vips.join(", ")
        );
    }
    println!("members:");
    println!(
        "  {:<4} {:<16} {:<28} {:>6} {:<8} {:>8} {:>7} {:>12} {:>14}",
        "id", "name", "underlay", "weight", "health", "check", "share", "fwd packets", "fwd bytes"
    );
    for m in &s.members {
        let health = match m.healthy {
            Some(true) => "up",
            Some(false) => "DOWN",
            None => "?",
        };
        println!(
            "  {:<4} {:<16} {:<28} {:>6} {:<8} {:>8} {:>6.2}% {:>12} {:>14}{}{}",
            m.id,
            m.name,
            m.underlay,
            m.weight,
            health,
            m.last_check_ms
                .map(|ms| format!("{ms:.1}ms"))
                .unwrap_or_else(|| "-".into()),
            m.share * 100.0,
            m.forwarded_packets,
            m.forwarded_bytes,
            if m.is_self { "  (this node)" } else { "" },
            m.last_error
                .as_ref()
                .filter(|_| m.healthy == Some(false))
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
        );
    }
    println!("data plane counters (packets, reason/action):");
    for (name, n) in s.counters.iter().filter(|(_, n)| *n > 0) {
        println!("  {name:<26} {n}");
    }
}

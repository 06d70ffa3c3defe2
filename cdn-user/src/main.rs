//! `cdn-steer`: the anycast steering controller and its command-line interface.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use cdn_user::{
    config, daemon,
    operator::{
        check, cli,
        control::{self, ControlError, Request, Response, TraceSpec},
        logging, lookup,
        pop_drain::PopDrainReport,
        quic, status_text,
    },
};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use thiserror::Error;

/// The exit codes, for `--help` and the README (which lists the same).
const EXIT_CODES: &str = "\
Exit codes:
  0   success (check: the file is valid and the host has no problem; warnings allowed)
  1   configuration error (the file is refused), or another failure
  2   host problem: check found the host not set up for the node (preflight)
  3   the daemon is unreachable (no control socket, no answer)
  4   the request was refused (by the daemon; for lookup --offline, by the configuration)
  5   drain --pop / undrain --pop: some member of the PoP could not be reached or refused
  64  usage error (unknown command or option, bad argument)";

#[derive(Parser)]
#[command(
    name = "cdn-steer",
    version,
    about = "XDP anycast steering: keeps every flow on the server that owns it",
    after_help = EXIT_CODES
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
        /// Run even if the bpf filesystem of the pins exists only in this process's private
        /// mount namespace (as under `ip netns exec`), so that the pins, and XDP with them,
        /// go away when the daemon exits. Without it the daemon refuses to start then.
        #[arg(long)]
        allow_ephemeral_pins: bool,
    },
    /// Validate a configuration, show the table it would build, and check this host for the
    /// node it describes (sysctls, VIPs on lo, interfaces and XDP, MTU, bpffs, BIRD), naming
    /// the fix of each problem.
    #[command(after_help = EXIT_CODES)]
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Check the file only, not this host (e.g. on a laptop).
        #[arg(long)]
        no_host: bool,
        /// Print the result as one JSON document (see the README, "Exit codes and JSON").
        #[arg(long)]
        json: bool,
    },
    /// Show the running daemon's state.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop taking new connections on this node and withdraw its routes; flows continue.
    #[command(after_help = EXIT_CODES)]
    Drain {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[command(flatten)]
        pop: PopArgs,
    },
    /// Take new connections again.
    #[command(after_help = EXIT_CODES)]
    Undrain {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[command(flatten)]
        pop: PopArgs,
    },
    /// Make the running daemon re-read its configuration file (as SIGHUP does) and say whether
    /// it took it; exits non-zero with the reason when the daemon refused it.
    Reload {
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Show which member owns a flow, with the data plane's hash and the live table (or,
    /// with --offline, the table computed from the configuration).
    #[command(after_help = EXIT_CODES)]
    Lookup {
        /// Client address and port, e.g. 198.51.100.7:40000 or [2001:db8::7]:40000.
        #[arg(required_unless_present = "cid")]
        src: Option<SocketAddr>,
        /// VIP and port, e.g. 192.0.2.1:443.
        #[arg(required_unless_present = "cid")]
        dst: Option<SocketAddr>,
        #[arg(value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        /// A QUIC destination connection ID in hex: which member it routes to under each QUIC
        /// service's QUIC-LB settings (with a UDP flow to a QUIC port: where that flow's
        /// packets carrying it go).
        #[arg(long)]
        cid: Option<String>,
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Compute the owner from the configuration alone, without a daemon: every member
        /// healthy, no hop history. Needs --config.
        #[arg(long, requires = "config", conflicts_with = "socket")]
        offline: bool,
        /// Print the answer as one JSON document.
        #[arg(long)]
        json: bool,
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
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Print a shell completion script, or write the man pages into DIR (print the main page
    /// without DIR). For packaging, hence hidden.
    #[command(hide = true)]
    Generate {
        what: Generated,
        dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Generated {
    Man,
    Bash,
    Zsh,
    Fish,
}

/// How a client command finds the daemon's control socket. Without either option: the
/// default socket path.
#[derive(Args, Clone)]
struct DaemonArgs {
    /// Configuration of the daemon: its node.control_socket is used (only that key has to be
    /// readable, so a file the daemon refused still works if it parses as TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The daemon's control socket, used as given: works whatever state the configuration
    /// file is in. Not together with --config (which one would be meant is ambiguous).
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    socket: Option<PathBuf>,
}

/// `drain --pop` and `undrain --pop`.
#[derive(Args, Clone, Copy)]
struct PopArgs {
    /// The whole PoP: this node, and every other member of its PoP over the peer plane
    /// (members need a `sync` address). Says per member what happened.
    #[arg(long)]
    pop: bool,
    /// With --pop: print the answer as one JSON document.
    #[arg(long, requires = "pop")]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

/// Why a command failed, each with its exit code.
#[derive(Debug, Error)]
enum CliError {
    /// The configuration file was refused.
    #[error("{0}")]
    Config(String),
    /// `check` found the file refused or host problems, and its report said so already.
    #[error("check: {0:?}")]
    Checked(check::Verdict),
    /// No answer on the control socket (missing, refused, timed out, broken off).
    #[error(transparent)]
    Unreachable(#[from] ControlError),
    /// The daemon (or, offline, the configuration) refused the request.
    #[error("{0}")]
    Refused(String),
    /// `drain --pop`: some member of the PoP is not in the asked-for state.
    #[error("{0}")]
    Incomplete(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Failed(_) => 1,
            Self::Checked(verdict) => verdict.exit_code(),
            Self::Unreachable(_) => 3,
            Self::Refused(_) => 4,
            Self::Incomplete(_) => 5,
        }
    }
}

/// Usage errors exit with 64 (`EX_USAGE`), not clap's 2, which means "host problem" here.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    logging::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version come this way too, on stdout, and are no error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if !matches!(cli.command, Command::Run { .. }) {
        // A client command piped into `head` should end quietly when the pipe closes, like any
        // Unix tool, instead of panicking on the failed write. (The daemon keeps Rust's default,
        // SIGPIPE ignored, so a closed socket is an error to handle, not the end of it.)
        // SAFETY: setting a signal disposition to its default is always sound.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ CliError::Checked(_)) => ExitCode::from(e.exit_code()),
        Err(e) => {
            eprintln!("cdn-steer: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The daemon's control socket, as `daemon` says where to find it.
fn socket_of(daemon: DaemonArgs) -> Result<PathBuf, CliError> {
    match daemon.socket {
        Some(socket) => Ok(socket),
        None => cli::control_socket_of(daemon.config.as_deref()).map_err(|e| {
            CliError::Config(format!(
                "{e:#}\n(--socket PATH reaches the daemon without reading the file)"
            ))
        }),
    }
}

async fn ask(daemon: DaemonArgs, request: Request) -> Result<Response, CliError> {
    let socket = socket_of(daemon)?;
    let response = control::call(&socket, &request, Duration::from_secs(10)).await?;
    if let Response::Error { message } = response {
        return Err(CliError::Refused(message));
    }
    Ok(response)
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run {
            config,
            keep_attached,
            reset_maps,
            shutdown_grace_ms,
            allow_ephemeral_pins,
        } => Ok(runtime()?.block_on(daemon::run(daemon::Options {
            config_path: config,
            detach_on_exit: !keep_attached,
            reset_maps,
            shutdown_grace: Duration::from_millis(shutdown_grace_ms),
            allow_ephemeral_pins,
        }))?),
        Command::Check {
            config,
            no_host,
            json,
        } => {
            let doc = check::check(&config, !no_host);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?
                );
            } else if doc.verdict == check::Verdict::ConfigError {
                eprint!("{}", check::render(&doc));
            } else {
                print!("{}", check::render(&doc));
            }
            match doc.verdict {
                check::Verdict::Ok => Ok(()),
                verdict => Err(CliError::Checked(verdict)),
            }
        }
        Command::Status { daemon, json } => {
            let response = runtime()?.block_on(ask(daemon, Request::Status))?;
            let Response::Status(status) = response else {
                return Err(anyhow::anyhow!("unexpected answer from the daemon").into());
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(anyhow::Error::from)?
                );
            } else {
                print!("{}", status_text::render(&status));
            }
            Ok(())
        }
        Command::Drain { daemon, pop } => drain(daemon, pop, true),
        Command::Undrain { daemon, pop } => drain(daemon, pop, false),
        Command::Reload { daemon } => done(runtime()?.block_on(ask(daemon, Request::Reload))?),
        Command::Lookup {
            src,
            dst,
            proto,
            cid,
            daemon,
            offline,
            json,
        } => {
            let udp = matches!(proto, Proto::Udp);
            let cfg = match (offline, &daemon.config) {
                (true, Some(path)) => {
                    Some(config::load(path).map_err(|e| CliError::Config(e.to_string()))?)
                }
                _ => None,
            };
            let cid = match (cid, &cfg) {
                (None, _) => None,
                (Some(text), Some(cfg)) => {
                    Some(quic::offline(cfg, &text).map_err(|e| CliError::Refused(e.to_string()))?)
                }
                (Some(cid), None) => {
                    let response =
                        runtime()?.block_on(ask(daemon.clone(), Request::Cid { cid }))?;
                    let Response::Cid(doc) = response else {
                        return Err(anyhow::anyhow!("unexpected answer from the daemon").into());
                    };
                    Some(*doc)
                }
            };
            let (Some(src), Some(dst)) = (src, dst) else {
                // Only a connection ID (clap requires both addresses otherwise).
                let cid = cid.context("lookup needs a flow or --cid")?;
                return print_doc(&cid, json, quic::render);
            };
            let mut doc = match &cfg {
                Some(cfg) => lookup::offline(cfg, src, dst, udp).map_err(|e| match e {
                    lookup::LookupError::Table(_) => CliError::Failed(e.into()),
                    _ => CliError::Refused(e.to_string()),
                })?,
                None => {
                    let response =
                        runtime()?.block_on(ask(daemon, Request::Lookup { src, dst, udp }))?;
                    let Response::Lookup(r) = response else {
                        return Err(anyhow::anyhow!("unexpected answer from the daemon").into());
                    };
                    lookup::live(r, src, dst, udp)
                }
            };
            if let Some(cid) = &cid {
                quic::flow_with_cid(&mut doc, cid);
            }
            print_doc(&doc, json, lookup::render)
        }
        Command::Trace {
            vip,
            client,
            port,
            reasons,
            count,
            json,
            daemon,
        } => {
            let socket = socket_of(daemon)?;
            let spec = TraceSpec {
                vip,
                client,
                port,
                reasons,
                count,
            };
            Ok(runtime()?.block_on(trace(&socket, spec, json))?)
        }
        Command::Generate { what, dir } => Ok(generate(what, dir)?),
    }
}

/// `cdn-steer trace`: prints every response line until the daemon ends the trace.
async fn trace(socket: &std::path::Path, spec: TraceSpec, json: bool) -> Result<()> {
    use std::io::Write as _;
    let mut responses = control::stream(socket, &Request::Trace(spec)).await?;
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

fn generate(what: Generated, dir: Option<PathBuf>) -> Result<()> {
    use clap_complete::Shell;
    let shell = match what {
        Generated::Man => {
            return match dir {
                // One page per subcommand too: the main page only lists them by name.
                Some(dir) => clap_mangen::generate_to(Cli::command(), &dir)
                    .with_context(|| format!("writing the man pages into {}", dir.display())),
                None => Ok(clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?),
            };
        }
        Generated::Bash => Shell::Bash,
        Generated::Zsh => Shell::Zsh,
        Generated::Fish => Shell::Fish,
    };
    if dir.is_some() {
        bail!("completions go to stdout; DIR is for the man pages");
    }
    // clap_complete offers hidden subcommands too; complete from a copy without them.
    let full = Cli::command();
    let mut visible = clap::Command::new("cdn-steer")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    clap_complete::generate(shell, &mut visible, "cdn-steer", &mut std::io::stdout());
    Ok(())
}

/// `drain` / `undrain`, of this node or (`--pop`) of its whole PoP.
fn drain(daemon: DaemonArgs, pop: PopArgs, drain: bool) -> Result<(), CliError> {
    let request = match (pop.pop, drain) {
        (true, _) => Request::DrainPop { drain },
        (false, true) => Request::Drain,
        (false, false) => Request::Undrain,
    };
    let response = runtime()?.block_on(ask(daemon, request))?;
    if !pop.pop {
        return done(response);
    }
    let Response::PopDrain(report) = response else {
        return Err(anyhow::anyhow!("unexpected answer from the daemon").into());
    };
    print_doc(&report, pop.json, PopDrainReport::render)?;
    if report.complete() {
        return Ok(());
    }
    Err(CliError::Incomplete(format!(
        "PoP {}: not {} on {}",
        report.pop,
        if drain { "drained" } else { "undrained" },
        report.failed().join(", ")
    )))
}

fn done(response: Response) -> Result<(), CliError> {
    match response {
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        _ => Err(anyhow::anyhow!("unexpected answer from the daemon").into()),
    }
}

/// A command's answer: one JSON document, or its text.
fn print_doc<T: serde::Serialize>(
    doc: &T,
    json: bool,
    text: fn(&T) -> String,
) -> Result<(), CliError> {
    if json {
        let doc = serde_json::to_string_pretty(doc).map_err(anyhow::Error::from)?;
        println!("{doc}");
    } else {
        print!("{}", text(doc));
    }
    Ok(())
}

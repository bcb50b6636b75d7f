//! `facwatch-gateway`: parses flags, loads the config, runs the gateway until
//! SIGINT/SIGTERM; or probes one meter once (`probe`). Exit codes: 0 done,
//! 1 runtime failure (for `probe`: no reading), 2 bad config or usage.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use facwatch_gateway::config::{Settings, DEFAULT_CONFIG};
use facwatch_gateway::probe::{probe, ProbeTarget};
use facwatch_gateway::Stats;
use facwatch_proto::clock::wall_now_ms;
use facwatch_proto::profile::{Parity, ProfileName, Ratios};
use facwatch_proto::site::{SerialLine, Transport};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "facwatch-gateway",
    version,
    about = "Polls plant power meters over Modbus, buffers every reading on disk, forwards batches over MQTT."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Gateway config file (TOML).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Wall time (Unix ms) at which a simulated clock reads `[clock] start`;
    /// default: now. Give the simulator the same value.
    #[arg(long, value_name = "N")]
    clock_anchor_unix_ms: Option<i64>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config (and the site file it names), then exit.
    CheckConfig,
    /// Print the default config file.
    PrintDefaultConfig,
    /// Read one meter once and print the decoded values (and, without
    /// --json, the raw registers), to check wiring, unit id and byte order.
    Probe(ProbeArgs),
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("transport").required(true).multiple(false))]
struct ProbeArgs {
    /// Built-in meter profile: dtsu666, ddsu666, adl400, adw300, sdm630,
    /// sdm120.
    #[arg(long, value_name = "NAME")]
    profile: String,
    /// Modbus TCP endpoint.
    #[arg(long, value_name = "HOST:PORT", group = "transport")]
    tcp: Option<String>,
    /// Serial device server passing RTU frames over TCP.
    #[arg(long, value_name = "HOST:PORT", group = "transport")]
    rtu_over_tcp: Option<String>,
    /// Local serial port (RS-485 adapter), Modbus RTU.
    #[arg(long, value_name = "PATH", group = "transport")]
    serial: Option<String>,
    /// Baud rate of the RS-485 line (default: the profile's).
    #[arg(long, value_name = "N")]
    baud: Option<u32>,
    /// Serial parity (default: the profile's).
    #[arg(long, value_enum)]
    parity: Option<ParityArg>,
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(7..=8))]
    data_bits: Option<u8>,
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=2))]
    stop_bits: Option<u8>,
    /// Modbus unit id (slave address).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=247))]
    unit: u8,
    /// Current transformer ratio (primary/secondary).
    #[arg(long, value_name = "N", default_value_t = 1.0)]
    ct: f64,
    /// Voltage transformer ratio (primary/secondary).
    #[arg(long, value_name = "N", default_value_t = 1.0)]
    pt: f64,
    /// Limit on the connect and on each request.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    timeout_ms: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ParityArg {
    None,
    Even,
    Odd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::PrintDefaultConfig) => {
            print!("{DEFAULT_CONFIG}");
            return ExitCode::SUCCESS;
        }
        Some(Command::Probe(args)) => return run_probe(args),
        _ => {}
    }
    let Some(config) = cli.config.as_deref() else {
        eprintln!("error: --config PATH is required");
        return ExitCode::from(2);
    };
    let anchor = cli.clock_anchor_unix_ms.unwrap_or_else(wall_now_ms);
    let settings = match Settings::load(config, anchor) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        println!(
            "{}: ok (site {}, gateway {}, {} meters)",
            config.display(),
            settings.site_id,
            settings.gateway.id,
            settings.meters.len()
        );
        return ExitCode::SUCCESS;
    }

    init_logging(cli.log_format);
    let names = Names {
        site: settings.site_id.clone(),
        gateway: settings.gateway.id.clone(),
    };
    match serve(settings, &names) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(
                site = %names.site,
                gateway = %names.gateway,
                error = format!("{e:#}"),
                "Gateway failed."
            );
            ExitCode::FAILURE
        }
    }
}

/// What every log line of a running gateway names.
#[derive(Clone)]
struct Names {
    site: String,
    gateway: String,
}

/// `probe`: exit 0 with the reading on stdout, 1 with one line on stderr
/// when the meter gives no reading, 2 for bad arguments.
fn run_probe(args: &ProbeArgs) -> ExitCode {
    let target = match probe_target(args) {
        Ok(target) => target,
        Err(ProbeArgError::Usage(problem)) => {
            eprintln!("error: {problem}");
            return ExitCode::from(2);
        }
        Err(ProbeArgError::Resolve(problem)) => {
            eprintln!("error: {problem}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(probe(&target)) {
        Ok(reading) if args.json => {
            println!("{}", reading.to_json());
            ExitCode::SUCCESS
        }
        Ok(reading) => {
            print!("{}", reading.to_table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

enum ProbeArgError {
    /// Arguments that cannot work together (exit 2).
    Usage(String),
    /// A host name that does not resolve (exit 1).
    Resolve(String),
}

fn probe_target(args: &ProbeArgs) -> Result<ProbeTarget, ProbeArgError> {
    let usage = |problem: String| ProbeArgError::Usage(problem);
    let profile: ProfileName = match args.profile.as_str() {
        "generic" => {
            return Err(usage(
                "--profile generic needs a register map from a site file; probe knows only the built-in profiles".into(),
            ))
        }
        name => name.parse().map_err(|e: String| usage(format!("--profile: {e}")))?,
    };
    let (default_baud, default_parity) = profile.default_serial();
    let serial_only = |flag: &str, given: bool| {
        if given {
            Err(usage(format!("{flag} applies only to --serial")))
        } else {
            Ok(())
        }
    };
    if args.serial.is_none() {
        serial_only("--parity", args.parity.is_some())?;
        serial_only("--data-bits", args.data_bits.is_some())?;
        serial_only("--stop-bits", args.stop_bits.is_some())?;
    }
    if args.tcp.is_some() && args.baud.is_some() {
        return Err(usage(
            "--baud applies only to --serial and --rtu-over-tcp".into(),
        ));
    }
    let baud = args.baud.unwrap_or(default_baud);
    if !(300..=921_600).contains(&baud) {
        return Err(usage(format!("--baud {baud} is outside 300..=921600")));
    }
    let transport = match (&args.tcp, &args.rtu_over_tcp, &args.serial) {
        (Some(endpoint), _, _) => Transport::Tcp(resolve("--tcp", endpoint)?),
        (_, Some(endpoint), _) => Transport::RtuOverTcp {
            address: resolve("--rtu-over-tcp", endpoint)?,
            baud,
        },
        (_, _, Some(path)) => Transport::Serial(SerialLine {
            path: path.clone(),
            baud,
            parity: match args.parity {
                None => default_parity,
                Some(ParityArg::None) => Parity::None,
                Some(ParityArg::Even) => Parity::Even,
                Some(ParityArg::Odd) => Parity::Odd,
            },
            data_bits: args.data_bits.unwrap_or(8),
            stop_bits: args.stop_bits.unwrap_or(1),
        }),
        (None, None, None) => {
            return Err(usage(
                "give one of --tcp, --rtu-over-tcp and --serial".into(),
            ))
        }
    };
    for (flag, ratio) in [("--ct", args.ct), ("--pt", args.pt)] {
        if !(ratio.is_finite() && ratio > 0.0) {
            return Err(usage(format!("{flag} {ratio} must be a positive number")));
        }
    }
    if args.timeout_ms == 0 {
        return Err(usage("--timeout-ms must be greater than 0".into()));
    }
    Ok(ProbeTarget {
        profile,
        transport,
        unit: args.unit,
        ratios: Ratios {
            ct: args.ct,
            pt: args.pt,
        },
        timeout: Duration::from_millis(args.timeout_ms),
    })
}

/// `HOST:PORT` to a socket address: a bad form is a usage error, a name
/// that does not resolve is a runtime one.
fn resolve(flag: &str, endpoint: &str) -> Result<SocketAddr, ProbeArgError> {
    if let Ok(address) = endpoint.parse() {
        return Ok(address);
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return Err(ProbeArgError::Usage(format!(
            "{flag} `{endpoint}` is not HOST:PORT (e.g. 192.168.1.20:502)"
        )));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(ProbeArgError::Usage(format!(
            "{flag} `{endpoint}` is not HOST:PORT (e.g. 192.168.1.20:502)"
        )));
    }
    match endpoint.to_socket_addrs() {
        Ok(mut addresses) => addresses.next().ok_or_else(|| {
            ProbeArgError::Resolve(format!("{flag}: `{host}` resolves to no address"))
        }),
        Err(e) => Err(ProbeArgError::Resolve(format!(
            "{flag}: cannot resolve `{host}`: {e}"
        ))),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,redb=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Our lines carry `site`, `gateway` (and `meter`, `line`) under
        // `fields`; a library's line (tokio-modbus, rumqttc, through `log`)
        // carries them in the span its call runs in, under `span`. Those
        // spans never nest, so the span list would only repeat it.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[tokio::main]
async fn serve(settings: Settings, names: &Names) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone(), names.clone()));
    let report = facwatch_gateway::run(settings, Arc::new(Stats::default()), shutdown)
        .await
        .context("gateway stopped")?;
    tracing::info!(
        site = %names.site,
        gateway = %names.gateway,
        samples_produced = report.samples_produced,
        acked_seq = report.acked_seq,
        "Gateway exited."
    );
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken, names: Names) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(e) => {
                    tracing::warn!(
                        site = %names.site,
                        gateway = %names.gateway,
                        error = %e,
                        "Cannot listen for SIGTERM."
                    );
                    let _ = interrupt.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!(
        site = %names.site,
        gateway = %names.gateway,
        "Shutting down: stop polling, flush, close."
    );
    shutdown.cancel();
}

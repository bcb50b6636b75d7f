//! `facwatch-sim`: serves the meters of a scenario's site on every bus of
//! the site file (Modbus TCP, RTU over TCP, RTU on serial ports) on a
//! virtual clock until the scenario ends or SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat};
use clap::{Parser, Subcommand, ValueEnum};
use facwatch_proto::clock::{wall_now_ms, Clock};
use facwatch_proto::site::ConfigError;
use facwatch_sim::{bind, serve, Endpoint, Plant, Scenario};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The scenario `print-default-config` prints.
const DEFAULT_SCENARIO: &str = include_str!("../default.scenario.toml");

#[derive(Debug, Parser)]
#[command(
    name = "facwatch-sim",
    version,
    about = "Simulated plant power meters (Modbus TCP, RTU over TCP, RTU on serial ports) driven by a scenario."
)]
struct Cli {
    /// Scenario file (TOML); its `site_file` names the site file.
    #[arg(long, visible_alias = "config", value_name = "PATH", global = true)]
    scenario: Option<PathBuf>,
    /// Wall-clock Unix ms at which virtual time is the scenario start
    /// (default: now). Give a gateway the same anchor to share the clock.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    clock_anchor_unix_ms: Option<i64>,
    /// Virtual seconds per wall-clock second (default: the scenario's
    /// time_scale).
    #[arg(long, value_name = "X")]
    time_scale: Option<f64>,
    /// Print one line per bus on stdout once all are bound, before
    /// serving: `SERVED CONFIGURED UNIT=METER,...` (e.g.
    /// `tcp://127.0.0.1:40123 tcp://127.0.0.1:0 1=l1-stenter,2=l1-pump`).
    #[arg(long)]
    print_endpoints: bool,
    /// Log format; levels come from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the scenario and its site file, then exit.
    CheckConfig,
    /// Print the built-in default scenario.
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if matches!(cli.command, Some(Command::PrintDefaultConfig)) {
        print!("{DEFAULT_SCENARIO}");
        return ExitCode::SUCCESS;
    }
    let (scenario, time_scale) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let problems = Plant::new(&scenario).threshold_problems();
    for problem in &problems {
        warn!(site = %scenario.site.id, "{problem}");
    }
    if matches!(cli.command, Some(Command::CheckConfig)) {
        println!(
            "ok: site `{}`, {} meters, {} shifts, {} faults{}",
            scenario.site.id,
            scenario.site.meters.len(),
            scenario.shifts.len(),
            scenario.faults.len(),
            if problems.is_empty() {
                String::new()
            } else {
                format!(", {} threshold warnings", problems.len())
            }
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = RunOptions {
        anchor: cli.clock_anchor_unix_ms,
        time_scale,
        print_endpoints: cli.print_endpoints,
    };
    match runtime.block_on(run(scenario, options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> Result<(Scenario, f64), ConfigError> {
    let command_line = |key: &str, problem: String| ConfigError::new("command line", key, problem);
    let path = cli
        .scenario
        .as_ref()
        .ok_or_else(|| command_line("--scenario", "is required (a scenario TOML file)".into()))?;
    let scenario = Scenario::load(path)?;
    let time_scale = match cli.time_scale {
        Some(scale) if !(scale.is_finite() && scale > 0.0) => {
            return Err(command_line(
                "--time-scale",
                format!("{scale} must be a positive number"),
            ))
        }
        Some(scale) => scale,
        None => scenario.time_scale,
    };
    Ok((scenario, time_scale))
}

struct RunOptions {
    anchor: Option<i64>,
    time_scale: f64,
    print_endpoints: bool,
}

async fn run(scenario: Scenario, options: RunOptions) -> anyhow::Result<()> {
    let (endpoints, _) = bind(&scenario.site, false)
        .await
        .context("binding and opening the meter buses of the site file")?;
    if options.print_endpoints {
        for endpoint in &endpoints {
            println!("{}", endpoint_line(endpoint));
        }
    }
    let time_scale = options.time_scale;
    let anchor = options.anchor.unwrap_or_else(wall_now_ms);
    let clock = Clock::simulated(scenario.start_ms, anchor, time_scale);
    let site = scenario.site.id.clone();
    let local = |ms: i64| {
        DateTime::from_timestamp_millis(ms).map_or_else(
            || ms.to_string(),
            |t| {
                t.with_timezone(&scenario.site.time_zone)
                    .to_rfc3339_opts(SecondsFormat::Secs, false)
            },
        )
    };
    info!(
        %site,
        start = %local(scenario.start_ms),
        end = %local(scenario.end_ms),
        virtual_start_unix_ms = scenario.start_ms,
        clock_anchor_unix_ms = anchor,
        time_scale,
        virtual_now = %local(clock.now_ms()),
        "Virtual clock: the scenario start at the anchor, time_scale times faster. Give the gateway the same clock."
    );

    let shutdown = CancellationToken::new();
    let until_end = clock.wall_until(scenario.end_ms);
    tokio::spawn({
        let shutdown = shutdown.clone();
        let site = site.clone();
        async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(until_end) => {
                    info!(%site, "The scenario has ended; stopping.");
                    shutdown.cancel();
                }
                signal = termination() => {
                    info!(%site, signal, "Stopping on signal.");
                    shutdown.cancel();
                }
            }
        }
    });
    serve(Arc::new(scenario), clock, endpoints, shutdown).await?;
    info!(%site, "Stopped.");
    Ok(())
}

/// `SERVED CONFIGURED UNIT=METER,...`, for `--print-endpoints`.
fn endpoint_line(endpoint: &Endpoint) -> String {
    let units: Vec<String> = endpoint
        .units()
        .iter()
        .map(|(unit, meter)| format!("{unit}={meter}"))
        .collect();
    format!(
        "{} {} {}",
        endpoint.served().bus(),
        endpoint.configured().bus(),
        units.join(",")
    )
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn termination() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                warn!(error = %e, "Cannot listen for SIGTERM; only SIGINT stops the simulator.");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,redb=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use facwatch_proto::site::Site;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn default_scenario_parses_against_the_demo_site() {
        let site = Site::from_toml(
            include_str!("../../deploy/stenter-plant.site.toml"),
            "stenter-plant.site.toml",
        )
        .unwrap();
        let scenario =
            Scenario::from_toml(DEFAULT_SCENARIO, "default.scenario.toml", site).unwrap();
        assert_eq!(scenario.faults.len(), 3);
        assert_eq!(scenario.time_scale, 1440.0);
        assert!(Plant::new(&scenario).threshold_problems().is_empty());
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "facwatch-sim",
            "--config",
            "s.toml",
            "--clock-anchor-unix-ms",
            "1700000000000",
            "--time-scale",
            "60",
            "--log-format",
            "json",
            "--print-endpoints",
        ])
        .unwrap();
        assert_eq!(cli.scenario, Some(PathBuf::from("s.toml")));
        assert_eq!(cli.clock_anchor_unix_ms, Some(1_700_000_000_000));
        assert_eq!(cli.time_scale, Some(60.0));
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(cli.print_endpoints);
        let cli =
            Cli::try_parse_from(["facwatch-sim", "check-config", "--scenario", "s.toml"]).unwrap();
        assert!(matches!(cli.command, Some(Command::CheckConfig)));
    }
}

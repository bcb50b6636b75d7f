//! `facwatch-gateway`: parses flags, loads the config, runs the gateway until
//! SIGINT/SIGTERM. Exit codes: 0 done, 1 runtime failure, 2 bad config or
//! usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use facwatch_gateway::config::{Settings, DEFAULT_CONFIG};
use facwatch_gateway::Stats;
use facwatch_proto::clock::wall_now_ms;
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
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::PrintDefaultConfig) = cli.command {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
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
    match serve(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Gateway failed.");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let report = facwatch_gateway::run(settings, Arc::new(Stats::default()), shutdown)
        .await
        .context("gateway stopped")?;
    tracing::info!(
        samples_produced = report.samples_produced,
        acked_seq = report.acked_seq,
        "Gateway exited."
    );
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot listen for SIGTERM.");
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
    tracing::info!("Shutting down: stop polling, flush, close.");
    shutdown.cancel();
}

//! `facwatch-ingest`: parses flags, loads the configuration, starts the
//! embedded broker when configured, and runs the ingest until SIGINT or
//! SIGTERM. Exit codes: 0 done, 1 runtime failure, 2 configuration error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use facwatch_ingest::broker::{hash_password, start_secured};
use facwatch_ingest::config::DEFAULT_CONFIG;
use facwatch_ingest::{BrokerMode, Settings, Stats};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "facwatch-ingest",
    version,
    about = "Receives gateway batches over MQTT, applies each exactly once, detects abnormal intervals, stores and emits events."
)]
struct Cli {
    /// Configuration file (see `print-default-config`).
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Log format; levels come from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and every site file, then exit.
    CheckConfig,
    /// Print the commented default configuration.
    PrintDefaultConfig,
    /// Read a password from stdin (one line) and print its argon2id hash,
    /// for `[broker.logins]`.
    HashPassword,
    /// Write a new random gateway key (64 hex digits, mode 0600) to FILE;
    /// copy it to the gateway's `gateway_key_file` and to this ingest's
    /// `keys_dir/<gateway>.key`. Prints the key's fingerprint.
    GatewayKey {
        /// The file to create (an existing file is never replaced).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
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
        Some(Command::HashPassword) => return print_password_hash(),
        Some(Command::GatewayKey { out }) => return write_gateway_key(out),
        _ => {}
    }
    init_logging(cli.log_format);

    let Some(config_path) = cli.config else {
        eprintln!("facwatch-ingest: --config PATH is required");
        return ExitCode::from(2);
    };
    let settings = match Settings::load(&config_path) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        let gateways: usize = settings.sites.iter().map(|s| s.gateways.len()).sum();
        println!(
            "{}: OK ({} sites, {gateways} gateways)",
            config_path.display(),
            settings.sites.len()
        );
        return ExitCode::SUCCESS;
    }

    match run(settings, &config_path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Ingest failed.");
            eprintln!("facwatch-ingest: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print_password_hash() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("facwatch-ingest: cannot read the password from stdin: {e}");
        return ExitCode::from(1);
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("facwatch-ingest: the password on stdin is empty");
        return ExitCode::from(2);
    }
    match hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("facwatch-ingest: {e}");
            ExitCode::from(1)
        }
    }
}

fn write_gateway_key(out: &Path) -> ExitCode {
    let key = match facwatch_proto::seal::GatewayKey::generate() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("facwatch-ingest: no random source: {e}");
            return ExitCode::from(1);
        }
    };
    match facwatch_proto::secret::create_private(out, key.to_hex_line().as_bytes()) {
        Ok(()) => {
            println!(
                "{}: new gateway key, fingerprint {}",
                out.display(),
                key.fingerprint()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("facwatch-ingest: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn,redb=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(mut settings: Settings, config_path: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tracing::info!(config = %config_path.display(), "Configuration loaded.");
    let stats = Arc::new(Stats::default());
    if let BrokerMode::Embedded { listen } = settings.broker {
        // Blocks until the broker accepts connections (a few seconds at most).
        let broker = start_secured(listen, &settings.broker_security, stats.clone())?;
        settings.mqtt.host = broker.internal.ip().to_string();
        settings.mqtt.port = broker.internal.port();
        settings.mqtt_credentials = broker.internal_login;
    }
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        facwatch_ingest::run(settings, stats, shutdown).await?;
        Ok(())
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen for SIGTERM; only SIGINT stops the ingest.");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping."),
        _ = terminate.recv() => tracing::info!("SIGTERM received; stopping."),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}

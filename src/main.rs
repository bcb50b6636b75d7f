//! `cargo run --release`: one simulated day of a dyeing-and-finishing plant
//! through the whole facwatch pipeline, in one process.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use facwatch::pipeline::{self, Options, Progress};
use facwatch::report::{self, ProgressView};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(
    version,
    about = "Runs a simulated plant day through simulator, gateway, broker and ingest."
)]
struct Args {
    /// Print each closed event as one JSON line on stdout (progress goes to
    /// stderr).
    #[arg(long)]
    json: bool,
    /// A scenario file (naming its site file) instead of the built-in plant.
    #[arg(long, value_name = "PATH")]
    scenario: Option<PathBuf>,
    /// Virtual seconds per wall-clock second, instead of the scenario's.
    #[arg(long, value_name = "X")]
    time_scale: Option<f64>,
    /// Keep the gateway buffer and ingest store here instead of a temporary
    /// directory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Serve the ingest's HTTP API on ADDR (IP:PORT) during the day and,
    /// after it, until interrupted (Ctrl-C), e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    serve: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let terminal = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rumqttd reports a client's clean disconnect as an error.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .with_ansi(terminal)
        .with_writer(move || LogLine {
            clear_progress_bar: terminal,
        })
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("facwatch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("facwatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes one log line to stderr, first erasing the progress bar drawn on
/// the terminal's current line (the bar is redrawn on the next tick).
struct LogLine {
    clear_progress_bar: bool,
}

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if std::mem::take(&mut self.clear_progress_bar) {
            err.write_all(b"\r\x1b[2K")?;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

async fn demo(args: Args) -> anyhow::Result<()> {
    if let Some(scale) = args.time_scale {
        anyhow::ensure!(
            scale.is_finite() && scale > 0.0,
            "--time-scale must be a positive number"
        );
    }
    let scenario = match &args.scenario {
        Some(path) => facwatch_sim::Scenario::load(path)?,
        None => facwatch::builtin_scenario()?,
    };
    let temp;
    let work_dir = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let tz = scenario.site.time_zone;
    eprintln!(
        "facwatch demo: {} ({}), {} to {}, {}x",
        scenario.site.name,
        scenario.site.id,
        report::local_minute(scenario.start_ms, tz),
        report::local_minute(scenario.end_ms, tz),
        args.time_scale.unwrap_or(scenario.time_scale)
    );
    let mut view = ProgressView::new(
        std::io::stderr().is_terminal(),
        scenario.start_ms,
        scenario.end_ms,
        tz,
    );
    let options = Options {
        time_scale: args.time_scale,
        http: args.serve,
        ..Options::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = tokio::spawn({
        let work_dir = work_dir.clone();
        async move { pipeline::run(scenario, &work_dir, options, tx).await }
    });
    while let Some(progress) = rx.recv().await {
        match &progress {
            Progress::Closed(event) => {
                if args.json {
                    println!("{event}");
                } else {
                    view.clear_line(&mut std::io::stderr());
                    println!("{}", event["notice"]["en"].as_str().unwrap_or_default());
                }
            }
            other => view.show(other),
        }
    }
    view.clear_line(&mut std::io::stderr());
    let outcome = run.await??;
    if args.json {
        eprint!("{}", report::summary(&outcome));
    } else {
        print!("{}", report::summary(&outcome));
    }
    anyhow::ensure!(
        outcome.samples_applied == outcome.samples_produced,
        "the ingest applied {} samples but the gateway took {}",
        outcome.samples_applied,
        outcome.samples_produced
    );
    if let Some(addr) = args.serve {
        serve(outcome.ingest, outcome.ingest_stats, addr).await?;
    }
    Ok(())
}

/// Runs the ingest again over the day's store, on the wall clock and with
/// the day's counters, so its HTTP API answers until SIGINT or SIGTERM.
async fn serve(
    mut settings: facwatch_ingest::Settings,
    stats: std::sync::Arc<facwatch_ingest::Stats>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    settings.clock = facwatch_proto::clock::Clock::real();
    settings.http = Some(facwatch_ingest::HttpSettings::open(addr));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let ingest = tokio::spawn(facwatch_ingest::run(
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    eprintln!("facwatch demo: the ingest's HTTP API is at http://{addr} (Ctrl-C to stop), e.g. curl http://{addr}/api/v1/events");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    shutdown.cancel();
    ingest.await??;
    Ok(())
}

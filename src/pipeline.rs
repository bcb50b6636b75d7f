//! The whole pipeline in one process: simulated plant -> gateway -> broker
//! -> ingest, wired over loopback exactly as the separate binaries are
//! (Modbus TCP, MQTT, redb files), on one shared virtual clock.
//!
//! Used by the demo (`cargo run --release`) and by the end-to-end tests.
//! Every socket binds port 0; every part stops through its own
//! cancellation token; the run ends when the gateway has polled up to the
//! end of the window and the ingest has acknowledged every batch.
//!
//! Secured as a deployment is: the embedded broker serves TLS with a
//! throwaway CA's certificate ([`crate::pki`]) and lets in only the
//! gateway's login and the platform's (argon2 hashes of passwords made up
//! for the run); the gateway seals its batches with a key made up for the
//! run, which the ingest holds.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use facwatch_ingest::detect::{Event, EventStatus};
use facwatch_proto::clock::Clock;
use facwatch_proto::seal::GatewayKey;
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_sim::Scenario;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The Modbus timeout of every meter in the pipeline (see `run`).
const SIMULATED_MODBUS_TIMEOUT: Duration = Duration::from_millis(20);

/// How to run a scenario.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Virtual span to run, default the scenario's `[start, end)`.
    pub window: Option<(i64, i64)>,
    /// Overrides the scenario's time scale.
    pub time_scale: Option<f64>,
    /// Stop the ingest at the first virtual time and start it again (same
    /// store) at the second, while the gateway keeps polling.
    pub ingest_outage: Option<(i64, i64)>,
    /// Serve the ingest's HTTP API here while the run goes on (see
    /// [`Outcome::ingest`] to serve it on afterwards).
    pub http: Option<std::net::SocketAddr>,
}

/// What the caller hears while the run goes on.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The virtual clock reads `now_ms` (sent about ten times a second).
    Tick {
        now_ms: i64,
        samples_produced: u64,
        samples_applied: u64,
        events_closed: usize,
    },
    /// The ingest published an event that just closed (the JSON the
    /// platform sees).
    Closed(serde_json::Value),
    /// The ingest was stopped or started again (outage option).
    Ingest { running: bool, now_ms: i64 },
    /// The broker is up (sent first): how a platform client reaches it,
    /// and the ingest's counters, live.
    Broker {
        access: BrokerAccess,
        ingest_stats: Arc<facwatch_ingest::Stats>,
    },
}

/// How an outside MQTT client (the platform) reaches the run's broker.
#[derive(Debug, Clone)]
pub struct BrokerAccess {
    /// The TLS address.
    pub addr: std::net::SocketAddr,
    /// TLS client config trusting the run's CA only.
    pub tls: facwatch_gateway::TlsSettings,
    /// The platform's login.
    pub login: facwatch_ingest::Credentials,
}

impl BrokerAccess {
    /// rumqttc options for a client `client_id` with this access.
    pub fn mqtt_options(&self, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.addr.ip().to_string(), self.addr.port());
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_credentials(self.login.username.clone(), self.login.password.clone())
            .set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(self.tls.client_config()),
            ));
        options
    }
}

/// A password made up for one run: 32 random bytes as hex.
fn made_up_password() -> anyhow::Result<String> {
    let key = GatewayKey::generate().context("no random source")?;
    Ok(key.to_hex_line().trim().to_string())
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub site: Site,
    /// Every event in the ingest's store at the end, by start time.
    pub events: Vec<Event>,
    pub samples_produced: u64,
    pub samples_applied: u64,
    pub batches_applied: u64,
    pub wall: Duration,
    /// The ingest's settings (store, broker, HTTP API) and counters, to run
    /// it again over the same store after the day.
    pub ingest: facwatch_ingest::Settings,
    pub ingest_stats: Arc<facwatch_ingest::Stats>,
}

/// Runs `scenario` through simulator, gateway, embedded broker and ingest,
/// keeping their files in `work_dir`.
pub async fn run(
    scenario: Scenario,
    work_dir: &Path,
    options: Options,
    progress: mpsc::UnboundedSender<Progress>,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let (from_ms, until_ms) = options
        .window
        .unwrap_or((scenario.start_ms, scenario.end_ms));
    if from_ms >= until_ms {
        bail!("empty window: {from_ms} >= {until_ms}");
    }
    let scale = options.time_scale.unwrap_or(scenario.time_scale);
    let Some(gateway_id) = scenario.site.gateways.first().map(|g| g.id.clone()) else {
        bail!("the scenario's site has no gateway");
    };

    // Meters on ephemeral ports; the site seen by gateway and ingest points
    // at them.
    let (endpoints, site) = facwatch_sim::bind(&scenario.site, true)
        .await
        .context("binding simulated meters")?;
    let clock = Clock::starting_now(from_ms, scale);
    let stop_sim = CancellationToken::new();
    let sim = tokio::spawn(facwatch_sim::serve(
        Arc::new(scenario),
        clock,
        endpoints,
        stop_sim.clone(),
    ));

    // The secrets of the run: the gateway's key, a CA and the broker's
    // certificate, the gateway's and the platform's logins.
    let key = GatewayKey::generate().context("no random source")?;
    let pki = crate::pki::create(&work_dir.join("tls"), "facwatch demo")?;
    let gateway_login = facwatch_ingest::Credentials {
        username: gateway_id.clone(),
        password: made_up_password()?,
    };
    let platform_login = facwatch_ingest::Credentials {
        username: "platform".into(),
        password: made_up_password()?,
    };
    let mut logins = facwatch_ingest::Logins::default();
    for login in [&gateway_login, &platform_login] {
        let hash =
            facwatch_ingest::broker::hash_password(&login.password).map_err(anyhow::Error::msg)?;
        logins
            .insert(&login.username, &hash)
            .map_err(anyhow::Error::msg)?;
    }
    let security = facwatch_ingest::BrokerSecurity {
        tls: Some(facwatch_ingest::BrokerTls {
            cert_file: pki.broker_cert_file.clone(),
            key_file: pki.broker_key_file.clone(),
        }),
        logins,
    };
    let tls = facwatch_gateway::TlsSettings::load(facwatch_gateway::TlsFiles {
        ca_file: pki.ca_file.clone(),
        client: None,
    })
    .map_err(anyhow::Error::msg)?;

    let ingest_stats = Arc::new(facwatch_ingest::Stats::default());
    let broker = facwatch_ingest::broker::start_secured(
        "127.0.0.1:0".parse()?,
        &security,
        ingest_stats.clone(),
    )
    .context("starting the embedded MQTT broker")?;
    let access = BrokerAccess {
        addr: broker.addr,
        tls: tls.clone(),
        login: platform_login,
    };
    let _ = progress.send(Progress::Broker {
        access: access.clone(),
        ingest_stats: ingest_stats.clone(),
    });

    // The platform's view: closed events as published on MQTT.
    let stop_watch = CancellationToken::new();
    let watcher = tokio::spawn(watch_events(
        access,
        site.id.clone(),
        progress.clone(),
        stop_watch.clone(),
    ));

    let ingest_settings = {
        let mut s = facwatch_ingest::Settings::new(
            vec![site.clone()],
            HashMap::from([(gateway_id.clone(), key.clone())]),
            work_dir.join("ingest.redb"),
            facwatch_ingest::MqttSettings {
                host: broker.internal.ip().to_string(),
                port: broker.internal.port(),
                client_id: "facwatch-ingest".into(),
            },
        )?;
        s.mqtt_credentials = broker.internal_login.clone();
        s.clock = clock;
        s.http = options.http.map(facwatch_ingest::HttpSettings::open);
        s
    };
    let mut ingest = Some(start_ingest(ingest_settings.clone(), ingest_stats.clone()));

    let gateway_settings = {
        let mut s = facwatch_gateway::Settings::new(
            &site,
            &gateway_id,
            facwatch_gateway::MqttSettings {
                credentials: Some(facwatch_gateway::MqttCredentials {
                    username: gateway_login.username.clone(),
                    password: gateway_login.password.clone(),
                }),
                tls: Some(tls),
                ..facwatch_gateway::MqttSettings::new(
                    broker.addr.ip().to_string(),
                    broker.addr.port(),
                    &gateway_id,
                )
            },
            key,
            work_dir.join("gateway.redb"),
            clock,
        )?;
        s.poll_until_ms = Some(until_ms);
        s.ack_timeout = Duration::from_millis(500);
        // At 1440x a live batch is cut every 42 ms of wall time, faster
        // than the default replay pace; the demo has one gateway.
        s.replay = facwatch_gateway::ReplayPace::UNLIMITED;
        // The commit interval is wall time: at 1440x the default 1 s would
        // hold 24 virtual minutes of samples back from the ingest, and the
        // events would close late enough to count as found in a replay.
        s.commit_interval = Duration::from_millis(20);
        // Modbus timeouts are wall time too: the site's 250 ms is 6 virtual
        // minutes at 1440x, during which a silent meter would hold up every
        // other meter of its bus and make their data look interrupted (R5).
        // The simulated meters answer over loopback in well under 1 ms.
        // For the same reason no retry: with one, a meter that falls silent
        // costs its bus two timeouts (about two poll slots at 1440x) before
        // backoff skips it, and on a busy machine the other meters of the
        // bus then miss enough polls to show R5 interruptions of their own.
        for meter in &mut s.meters {
            meter.timeout = meter.timeout.min(SIMULATED_MODBUS_TIMEOUT);
            meter.retries = 0;
        }
        s
    };
    let gateway_stats = Arc::new(facwatch_gateway::Stats::default());
    let stop_gateway = CancellationToken::new();
    let mut gateway = tokio::spawn(facwatch_gateway::run(
        gateway_settings,
        gateway_stats.clone(),
        stop_gateway.clone(),
    ));

    let mut outage = options.ingest_outage;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let report = loop {
        tokio::select! {
            result = &mut gateway => break result.context("gateway task")??,
            _ = ticker.tick() => {}
        }
        let now_ms = clock.now_ms();
        if let Some((down_ms, up_ms)) = outage {
            if ingest.is_some() && now_ms >= down_ms {
                stop_ingest(ingest.take().expect("checked")).await?;
                let _ = progress.send(Progress::Ingest {
                    running: false,
                    now_ms,
                });
            }
            if ingest.is_none() && now_ms >= up_ms {
                ingest = Some(start_ingest(ingest_settings.clone(), ingest_stats.clone()));
                let _ = progress.send(Progress::Ingest {
                    running: true,
                    now_ms,
                });
                outage = None;
            }
        }
        let ingest_now = ingest_stats.snapshot();
        let _ = progress.send(Progress::Tick {
            now_ms: now_ms.min(until_ms),
            samples_produced: gateway_stats.samples_produced.load(Ordering::Relaxed),
            samples_applied: ingest_now.samples_applied,
            events_closed: ingest_now.events_closed as usize,
        });
    };
    // The gateway returned: every batch up to the end is acked, so the
    // ingest has committed it.
    if let Some(handle) = ingest.take() {
        stop_ingest(handle).await?;
    }
    stop_sim.cancel();
    sim.await.context("simulator task")??;

    let store = facwatch_ingest::store::Store::open(&work_dir.join("ingest.redb"))?;
    let events = store.events()?;
    let samples_applied = store.samples_applied(&gateway_id)?;
    let batches_applied = store.last_seq(&gateway_id)?.unwrap_or(0);
    drop(store);

    // Let the platform view catch up with what the store holds, bounded.
    let closed: HashSet<String> = events
        .iter()
        .filter(|e| e.status == EventStatus::Closed)
        .map(|e| e.id.clone())
        .collect();
    stop_watch.cancel();
    let seen = watcher.await.context("event watcher task")?;
    for event in events
        .iter()
        .filter(|e| closed.contains(&e.id) && !seen.contains(&e.id))
    {
        // Published before the watcher subscribed, or after it stopped.
        let _ = progress.send(Progress::Closed(event.to_json(site.time_zone)));
    }

    Ok(Outcome {
        site,
        events,
        samples_produced: report.samples_produced,
        samples_applied,
        batches_applied,
        wall: started.elapsed(),
        ingest: ingest_settings,
        ingest_stats,
    })
}

type IngestTask = (
    CancellationToken,
    JoinHandle<Result<(), facwatch_ingest::IngestError>>,
);

fn start_ingest(
    settings: facwatch_ingest::Settings,
    stats: Arc<facwatch_ingest::Stats>,
) -> IngestTask {
    let stop = CancellationToken::new();
    let handle = tokio::spawn(facwatch_ingest::run(settings, stats, stop.clone()));
    (stop, handle)
}

async fn stop_ingest((stop, handle): IngestTask) -> anyhow::Result<()> {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .context("ingest did not stop within 10 s")?
        .context("ingest task")??;
    Ok(())
}

/// Subscribes to the site's events topic and reports closed events, once
/// per id. Returns the ids it reported.
async fn watch_events(
    access: BrokerAccess,
    site: String,
    progress: mpsc::UnboundedSender<Progress>,
    stop: CancellationToken,
) -> HashSet<String> {
    let options = access.mqtt_options("facwatch-demo-platform");
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let topic = topics::events(&site);
    let mut seen = HashSet::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                // Queues the request; the event loop sends it.
                let _ = client.try_subscribe(&topic, QoS::AtLeastOnce);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                let Ok(json) = serde_json::from_slice::<serde_json::Value>(&publish.payload) else {
                    continue;
                };
                let closed = json["status"] == "closed";
                let id = json["id"].as_str().unwrap_or_default().to_string();
                if closed && seen.insert(id) {
                    let _ = progress.send(Progress::Closed(json));
                }
            }
            Ok(_) => {}
            Err(_) => {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    seen
}

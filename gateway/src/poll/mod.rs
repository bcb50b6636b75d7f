//! Stage one of the gateway: reading the meters.
//!
//! Meters are grouped by bus ([`Transport::bus`]): the same serial port,
//! the same serial device server, or the same Modbus TCP endpoint. One task
//! per bus owns the bus's [`link::BusLink`] and polls its meters one request
//! at a time; separate buses poll concurrently.
//!
//! A meter's timeouts cost its whole bus time, so a meter that does not
//! answer is asked less and less often (see [`schedule`] for the exact
//! rule), while each of its slots still yields an `Offline` sample.
//!
//! Each bus polls at virtual times aligned to multiples of the poll
//! interval; at each slot every meter of the bus yields exactly one sample.
//! Whom to ask, in which order, with how many attempts, and who is backing
//! off is decided by the pure [`schedule::BusSchedule`]; this module only
//! carries out its turns. A sample's time is the virtual time at the start
//! of its poll (for a meter skipped while it backs off: when the bus reached
//! it). Samples go to the batcher over a bounded channel; when it is full the
//! bus task waits (`Block`), which can only cost slots of its own bus.
//!
//! When a link cannot be opened in a slot, the bus's remaining meters in
//! that slot are not tried again: they yield `Offline` samples at once, so
//! an unreachable device server costs one connect timeout per slot, not
//! one per meter.

pub(crate) mod link;
pub(crate) mod sample;
pub(crate) mod schedule;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::clock::Clock;
use facwatch_proto::site::{Meter, Transport};
use facwatch_proto::wire::{Quality, Sample};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{MeterPolls, Settings, Stats};
use link::BusLink;
use sample::{health_change, HealthChange, PollOutcome};
use schedule::{next_slot, BusSchedule, Turn};

/// What polling needs to know: the meters and when to read them.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Site id, for logs.
    pub site: String,
    /// Gateway id, for logs.
    pub gateway: String,
    /// Virtual time between polls of a meter.
    pub poll_interval: Duration,
    pub clock: Clock,
    /// Exclusive end of polling, virtual ms.
    pub until_ms: Option<i64>,
    /// The meters, in site-file order (which is also the order on each bus).
    pub meters: Vec<Meter>,
    /// Meter id -> its line, for logs (see `Settings::meter_lines`).
    pub meter_lines: HashMap<String, String>,
}

impl PollSettings {
    /// The polling part of the gateway's settings.
    pub fn of(settings: &Settings) -> PollSettings {
        PollSettings {
            site: settings.site_id.clone(),
            gateway: settings.gateway.id.clone(),
            poll_interval: settings.gateway.poll_interval,
            clock: settings.clock,
            until_ms: settings.poll_until_ms,
            meters: settings.meters.clone(),
            meter_lines: settings.meter_lines.clone(),
        }
    }

    /// The line `meter` belongs to, if it measures a facility of one.
    fn line_of(&self, meter: &str) -> Option<&str> {
        self.meter_lines.get(meter).map(String::as_str)
    }
}

/// A bus task that did not finish.
#[derive(Debug, thiserror::Error)]
#[error("polling task of bus {bus} failed: {reason}")]
pub struct PollError {
    pub bus: String,
    pub reason: String,
}

/// Polls every meter until `shutdown` is cancelled, `until_ms` is reached or
/// the receiver of `samples` is gone.
pub async fn run(
    settings: PollSettings,
    samples: mpsc::Sender<Sample>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), PollError> {
    let settings = Arc::new(settings);
    // Counters in site-file order, whichever bus task starts first.
    for meter in &settings.meters {
        stats.meter_polls(&meter.id);
    }
    let mut tasks = Vec::new();
    for (bus, meters) in buses(&settings.meters) {
        let task = tokio::spawn(run_bus(
            meters,
            Arc::clone(&settings),
            samples.clone(),
            Arc::clone(&stats),
            shutdown.clone(),
        ));
        tasks.push((bus, task));
    }
    drop(samples);
    let mut failure = None;
    for (bus, task) in tasks {
        if let Err(e) = task.await {
            failure.get_or_insert(PollError {
                bus,
                reason: e.to_string(),
            });
        }
    }
    if let Some(until_ms) = settings.until_ms.filter(|_| !shutdown.is_cancelled()) {
        tracing::info!(
            site = %settings.site,
            gateway = %settings.gateway,
            until_ms,
            "Polling reached its end time."
        );
    }
    failure.map_or(Ok(()), Err)
}

/// Groups meters by bus, buses in order of their first meter, meters in
/// their given order.
fn buses(meters: &[Meter]) -> Vec<(String, Vec<Meter>)> {
    let mut buses: Vec<(String, Vec<Meter>)> = Vec::new();
    for meter in meters {
        let bus = meter.transport.bus();
        match buses.iter_mut().find(|(b, _)| *b == bus) {
            Some((_, meters)) => meters.push(meter.clone()),
            None => buses.push((bus, vec![meter.clone()])),
        }
    }
    buses
}

/// Polls the meters of one bus (all with the same transport).
async fn run_bus(
    meters: Vec<Meter>,
    settings: Arc<PollSettings>,
    samples: mpsc::Sender<Sample>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let Some(transport) = meters.first().map(|m| m.transport.clone()) else {
        return;
    };
    let clock = settings.clock;
    let mut schedule = BusSchedule::new(settings.poll_interval, meters.iter().map(|m| m.retries));
    let mut link = BusLink::new(transport.clone());
    let mut health: Vec<Option<Quality>> = vec![None; meters.len()];
    let counters: Vec<Arc<MeterPolls>> = meters.iter().map(|m| stats.meter_polls(&m.id)).collect();
    let mut last_slot = None;
    tracing::debug!(
        site = %settings.site,
        gateway = %settings.gateway,
        bus = %link.bus(),
        meters = meters.len(),
        "Polling bus."
    );
    'slots: loop {
        let slot = next_slot(clock.now_ms(), schedule.interval_ms(), last_slot);
        if settings.until_ms.is_some_and(|until| slot >= until) {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(clock.wall_until(slot)) => {}
        }
        // Why the link could not be opened in this slot, if it could not.
        let mut link_down: Option<String> = None;
        for turn in schedule.turns(slot) {
            let (index, outcome, time_ms) = match turn {
                Turn::Skip { meter } => {
                    count(&counters[meter], &PollOutcome::BackedOff);
                    (meter, PollOutcome::BackedOff, clock.now_ms())
                }
                Turn::Poll {
                    meter: index,
                    attempts,
                } => {
                    let meter = &meters[index];
                    let started_ms = clock.now_ms();
                    let outcome = match &link_down {
                        Some(why) => PollOutcome::Unreachable(why.clone()),
                        None => tokio::select! {
                            () = stop.cancelled() => break 'slots,
                            result = link::read_meter(&mut link, meter, attempts)
                                .instrument(read_span(&settings, &transport, meter)) => {
                                PollOutcome::of_reads(meter, result)
                            }
                        },
                    };
                    if let PollOutcome::Unreachable(why) = &outcome {
                        link_down.get_or_insert_with(|| why.clone());
                    }
                    let quality = outcome.quality();
                    let cost_ms = clock.now_ms() - started_ms;
                    schedule.record(index, slot, quality, cost_ms);
                    count(&counters[index], &outcome);
                    log_health(&settings, &transport, meter, health[index], &outcome);
                    health[index] = Some(quality);
                    (index, outcome, started_ms)
                }
            };
            let sample = outcome.into_sample(&meters[index].id, time_ms);
            if samples.send(sample).await.is_err() {
                break 'slots;
            }
        }
        last_slot = Some(slot);
    }
}

/// The span a meter's read runs in. Our own lines carry their fields
/// explicitly; this is for the lines of the Modbus stack (tokio-modbus logs
/// frames it cannot decode, e.g. CRC errors on a noisy RS-485 line) and of
/// the link, which know no site. At ERROR level so that no log filter that
/// lets such a line through disables its span.
fn read_span(settings: &PollSettings, transport: &Transport, meter: &Meter) -> tracing::Span {
    tracing::error_span!(
        "poll",
        site = %settings.site,
        gateway = %settings.gateway,
        bus = %transport.bus(),
        meter = %meter.id,
        line = settings.line_of(&meter.id),
    )
}

/// Adds the slot to its meter's counter of its outcome's kind.
fn count(polls: &MeterPolls, outcome: &PollOutcome) {
    let counter = match outcome {
        PollOutcome::Read(_) => &polls.ok,
        PollOutcome::Timeout => &polls.timeout,
        PollOutcome::Exception(_) => &polls.exception,
        PollOutcome::Garbled(_) => &polls.decode,
        PollOutcome::Unreachable(_) => &polls.unreachable,
        PollOutcome::BackedOff => &polls.backed_off,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn log_health(
    settings: &PollSettings,
    transport: &Transport,
    meter: &Meter,
    previous: Option<Quality>,
    outcome: &PollOutcome,
) {
    match health_change(previous, outcome.quality()) {
        Some(HealthChange::Failing(quality)) => tracing::warn!(
            site = %settings.site,
            gateway = %settings.gateway,
            meter = %meter.id,
            line = settings.line_of(&meter.id),
            bus = %transport.bus(),
            unit = meter.unit,
            quality = quality.as_str(),
            error = %outcome.detail(),
            "Meter gives no readings; backing off."
        ),
        Some(HealthChange::Recovered) => tracing::info!(
            site = %settings.site,
            gateway = %settings.gateway,
            meter = %meter.id,
            line = settings.line_of(&meter.id),
            bus = %transport.bus(),
            unit = meter.unit,
            "Meter gives readings again."
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use facwatch_proto::profile::{Profile, ProfileName, Ratios, ReadLimits};

    use super::*;

    fn meter(id: &str, transport: Transport) -> Meter {
        Meter {
            id: id.into(),
            gateway: "gw".into(),
            profile: Profile::builtin(ProfileName::Sdm120),
            transport,
            unit: 1,
            ratios: Ratios::default(),
            read_limits: ReadLimits::default(),
            timeout: Duration::from_millis(100),
            retries: 1,
        }
    }

    #[test]
    fn meters_are_grouped_by_bus_in_site_order() {
        let a = "127.0.0.1:5020".parse().unwrap();
        let b = "127.0.0.1:5021".parse().unwrap();
        let meters = [
            meter("m1", Transport::Tcp(a)),
            meter(
                "m2",
                Transport::RtuOverTcp {
                    address: a,
                    baud: 9600,
                },
            ),
            meter("m3", Transport::Tcp(b)),
            meter("m4", Transport::Tcp(a)),
        ];
        let grouped: Vec<(String, Vec<String>)> = buses(&meters)
            .into_iter()
            .map(|(bus, meters)| (bus, meters.into_iter().map(|m| m.id).collect()))
            .collect();
        assert_eq!(
            grouped,
            vec![
                (
                    "tcp://127.0.0.1:5020".to_string(),
                    vec!["m1".into(), "m4".into()]
                ),
                (
                    "rtu-over-tcp://127.0.0.1:5020".to_string(),
                    vec!["m2".into()]
                ),
                ("tcp://127.0.0.1:5021".to_string(), vec!["m3".into()]),
            ]
        );
    }
}

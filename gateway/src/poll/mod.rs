//! Stage one of the gateway: reading the meters.
//!
//! One task per meter, each with its own Modbus TCP link, so a meter that
//! does not answer costs only its own task time and never delays another
//! meter. (Issue 3 will add shared RS-485 buses: a bus task will own one
//! [`modbus::ModbusLink`] and poll its meters in turn; the link already
//! switches unit id per meter.)
//!
//! Each task polls at virtual times aligned to multiples of the poll
//! interval ([`schedule::next_slot`]), skipping slots a slow poll overran.
//! A sample's time is the virtual time at the start of its poll. Samples go
//! to the batcher over a bounded channel; when it is full the task waits
//! (`Block`), which can only cost slots of its own meter.

pub(crate) mod modbus;
pub(crate) mod sample;
pub(crate) mod schedule;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::clock::Clock;
use facwatch_proto::site::Meter;
use facwatch_proto::wire::{Quality, Sample};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Stats;
use modbus::ModbusLink;
use sample::{health_change, HealthChange};

/// What every meter task of one gateway shares.
#[derive(Debug, Clone)]
pub(crate) struct PollPlan {
    pub(crate) site: String,
    pub(crate) gateway: String,
    /// Virtual time between polls of a meter.
    pub(crate) poll_interval: Duration,
    /// Wall-clock limit on the connect and on every Modbus call.
    pub(crate) modbus_timeout: Duration,
    pub(crate) clock: Clock,
    /// Exclusive end of polling, virtual ms.
    pub(crate) until_ms: Option<i64>,
}

/// Polls `meter` until `stop` is cancelled, its `until_ms` is reached or the
/// batcher is gone.
pub(crate) async fn run_meter(
    meter: Meter,
    plan: Arc<PollPlan>,
    samples: mpsc::Sender<Sample>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let interval_ms = (plan.poll_interval.as_millis() as i64).max(1);
    let facwatch_proto::site::Transport::Tcp(address) = meter.transport else {
        tracing::error!(
            site = %plan.site,
            gateway = %plan.gateway,
            meter = %meter.id,
            bus = %meter.transport.bus(),
            "Only Modbus TCP is polled so far; this meter is not."
        );
        return;
    };
    let mut link = ModbusLink::new(address, plan.modbus_timeout);
    let mut last_slot = None;
    let mut last_quality: Option<Quality> = None;
    loop {
        let slot = schedule::next_slot(plan.clock.now_ms(), interval_ms, last_slot);
        if plan.until_ms.is_some_and(|until| slot >= until) {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(plan.clock.wall_until(slot)) => {}
        }
        let started_ms = plan.clock.now_ms();
        let outcome = tokio::select! {
            () = stop.cancelled() => break,
            outcome = link.poll(&meter) => outcome,
        };
        let quality = outcome.quality();
        if quality == Quality::Ok {
            stats.polls_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.polls_failed.fetch_add(1, Ordering::Relaxed);
        }
        match health_change(last_quality, quality) {
            Some(HealthChange::Failing(quality)) => tracing::warn!(
                site = %plan.site,
                gateway = %plan.gateway,
                meter = %meter.id,
                quality = quality.as_str(),
                error = %outcome.detail(),
                "Meter gives no readings."
            ),
            Some(HealthChange::Recovered) => tracing::info!(
                site = %plan.site,
                gateway = %plan.gateway,
                meter = %meter.id,
                "Meter gives readings again."
            ),
            None => {}
        }
        last_quality = Some(quality);
        last_slot = Some(slot);
        if samples
            .send(outcome.into_sample(&meter.id, started_ms))
            .await
            .is_err()
        {
            break;
        }
    }
}

//! The apply task: every batch exactly once, in `seq` order per gateway,
//! committed in groups.
//!
//! Messages are taken into a **group**, up to [`MAX_GROUP_BATCHES`]
//! messages or [`MAX_GROUP_BYTES`] of payload, each validated (decoded) as
//! it is taken. A group starts, on the blocking pool, as soon as the one
//! before it is done (with everything already queued behind its messages);
//! while it is applied, the task takes and validates the messages of the
//! next. Under a steady trickle a group is one batch; when a backlog
//! arrives, one store transaction (one fsync) and one ack per gateway cover
//! many batches, and decoding overlaps the commits.
//!
//! Per batch, in arrival order:
//! 1. The topic's gateway must belong to a loaded site, the payload must
//!    decode, and the payload's gateway must equal the topic's; otherwise
//!    the batch is rejected: counted by reason, logged at a limited rate,
//!    and dropped without an ack. Nothing about it can stop other gateways.
//! 2. `seq <= last_seq[gw]`: a duplicate (the gateway resent because it
//!    missed the ack). Ignored; the gateway is acked again.
//! 3. A `seq` above `last_seq + 1` is applied only when the batch says the
//!    gateway discarded data before it (`dropped_before > 0`): that becomes
//!    an R5 data-interruption event (see `detect`) and is counted as a gap.
//!    Otherwise the batches in between are still in the gateway's buffer:
//!    the batch is ignored and the gateway acked again with `last_seq`, so
//!    it resends from `last_seq + 1` and nothing is acked away unseen.
//!    Before a gateway's first applied batch no gap is computed.
//! 4. Otherwise the detector applies the batch **on a copy** of the
//!    gateway's state, and `last_seq` advances on that copy.
//!
//! `last_seq` in these rules is the running one of the group: a batch sees
//! the batches of its gateway before it in the group as applied.
//!
//! Then, once per group: one store transaction writes, for every gateway a
//! batch was applied for, `last_seq`, the copy's detector snapshot and the
//! counters, and every event produced. **Only after the commit** do the
//! copies replace the live states, is **one** `Ack` per gateway of the group
//! published (retained; the highest applied `seq`, or `last_seq` for a
//! gateway whose batches were all duplicates or out of order) and are the
//! changed events emitted. If the commit fails nothing changed: no state,
//! no ack, and the gateways' resends are applied as if they were the first.
//!
//! On every connection to the broker (the first and each reconnect, e.g. to
//! a broker that lost its retained messages), the task publishes a retained
//! `Ack { last_seq, or 0 before the first batch }` for every gateway of
//! every loaded site, before applying the batches received on that
//! connection: a gateway with a fresh buffer sends nothing until it has an
//! ack. These acks only repeat committed state, so the rule "ack only after
//! commit" holds for them too.
//!
//! Notices (see `emit::notice`): the group's transaction also queues the
//! webhook notices of its event changes and keeps the replay summaries; the
//! task wakes the webhook senders after the commit. Between messages, a
//! timer ([`ApplyTask::tick`]) raises `gateway_silent` for a gateway that
//! sent no batch for `silent_after` (wall time; once, the alert is stored),
//! and completes a replay summary quiet for `replay_quiet`. Any valid batch
//! of a silent gateway clears its alert (`gateway_back`) before it is
//! applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use facwatch_proto::clock::Clock;
use facwatch_proto::seal::{self, GatewayKey, Purpose, MAX_SEALED_BATCH_BYTES};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::Batch;
use rumqttc::Publish;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::reject::{short_name, RejectLog, RejectReason};
use super::Inbound;
use crate::config::NoticeSettings;
use crate::detect::{DataLoss, GatewayDetector, Rule};
use crate::emit::influx::{Pending, Rendering};
use crate::emit::notice::{Alert, AlertKind, ReplaySummary};
use crate::emit::{self, Publisher};
use crate::stats::{Stats, WebhookCounter};
use crate::store::{
    Committed, GatewayCommit, GatewayCounters, InfluxCommit, NoticeContext, OutboxLimit, Produced,
    Queued, Store, StoreError,
};
use crate::IngestError;

/// Most batches applied in one store transaction. Large, because a commit's
/// fsync is the cost that a drain of small batches pays per group: from a
/// Mosquitto backlog of 10-sample batches, groups of up to 1024 applied
/// 978k samples/s, of up to 4096 1.17M (BENCHMARKS.md). The byte bounds
/// ([`MAX_GROUP_BYTES`], `receive::QUEUED_KIB`) keep memory bounded.
pub(crate) const MAX_GROUP_BATCHES: usize = 4096;
/// Most payload bytes applied in one store transaction (a group may exceed
/// it by its last batch, at most `MAX_BATCH_BYTES`).
pub(crate) const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;

struct GatewayState {
    site: Arc<Site>,
    detector: GatewayDetector,
    last_seq: Option<u64>,
}

/// The live state of every gateway and the store: the synchronous core of
/// the apply task, also driven directly by tests and the benchmark.
pub(crate) struct Applier {
    /// Gateways in site-file order (acks on connect go out in this order).
    order: Vec<String>,
    gateways: HashMap<String, GatewayState>,
    store: Arc<Store>,
    /// Every webhook's outbox, written with the events.
    webhooks: Arc<[OutboxLimit]>,
    /// The InfluxDB lines to write with the events, when configured.
    influx: Option<Rendering>,
}

/// One gateway's part of a group: a copy of its state, advanced batch by
/// batch, and what happened.
pub(crate) struct Work {
    pub(crate) gateway: String,
    site: Arc<Site>,
    detector: GatewayDetector,
    /// Running `last_seq`.
    pub(crate) last_seq: Option<u64>,
    /// Counter deltas of the applied batches.
    pub(crate) counters: GatewayCounters,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    /// Batches applied after a declared loss, for the log.
    losses: Vec<(u64, DataLoss)>,
}

/// A batch as received: decoded, and the payload it was decoded from
/// (queued as is in the InfluxDB outbox; `None` re-encodes the batch).
pub(crate) struct Received {
    pub(crate) batch: Batch,
    pub(crate) payload: Option<Bytes>,
}

/// A group ready to be applied off the async runtime.
pub(crate) struct Group {
    works: Vec<Work>,
    /// (index in `works`, batch), in arrival order.
    batches: Vec<(usize, Received)>,
    store: Arc<Store>,
    webhooks: Arc<[OutboxLimit]>,
    influx: Option<Rendering>,
}

/// What applying a group did. `committed` is `Ok` with the changed events
/// (and queued notices) when the transaction committed (or none was
/// needed).
pub(crate) struct GroupOutcome {
    pub(crate) works: Vec<Work>,
    pub(crate) committed: Result<Committed, StoreError>,
}

impl GroupOutcome {
    /// Batches applied (or, if the commit failed, that would have been).
    pub(crate) fn batches_applied(&self) -> u64 {
        self.works.iter().map(|w| w.counters.batches_applied).sum()
    }
}

impl Applier {
    /// Restores every gateway's detector and `last_seq` from the store.
    pub(crate) fn new(
        sites: &[Site],
        store: Arc<Store>,
        webhooks: Vec<OutboxLimit>,
    ) -> Result<Applier, IngestError> {
        let mut order = Vec::new();
        let mut gateways = HashMap::new();
        for site in sites {
            let site = Arc::new(site.clone());
            for gateway in &site.gateways {
                let id = gateway.id.as_str();
                let detector = match store.detector_snapshot(id)? {
                    Some(snapshot) => GatewayDetector::restore(site.clone(), id, &snapshot)
                        .map_err(|source| IngestError::Snapshot {
                            gateway: id.to_string(),
                            source,
                        })?,
                    None => GatewayDetector::new(site.clone(), id),
                };
                let last_seq = store.last_seq(id)?;
                debug!(site = %site.id, gateway = id, last_seq, "Gateway state restored.");
                order.push(id.to_string());
                gateways.insert(
                    id.to_string(),
                    GatewayState {
                        site: site.clone(),
                        detector,
                        last_seq,
                    },
                );
            }
        }
        Ok(Applier {
            order,
            gateways,
            store,
            webhooks: webhooks.into(),
            influx: None,
        })
    }

    /// Writes InfluxDB lines with every commit from now on.
    pub(crate) fn with_influx(mut self, rendering: Rendering) -> Applier {
        self.influx = Some(rendering);
        self
    }

    fn site_id(&self, gateway: &str) -> Option<&str> {
        self.gateways.get(gateway).map(|g| g.site.id.as_str())
    }

    /// Every gateway with the seq its ack carries: `last_seq`, 0 before the
    /// first applied batch.
    pub(crate) fn acks(&self) -> Vec<(String, u64)> {
        self.order
            .iter()
            .map(|id| (id.clone(), self.gateways[id].last_seq.unwrap_or(0)))
            .collect()
    }

    /// [`Applier::prepare_received`] for batches without their payloads
    /// (tests).
    #[cfg(test)]
    pub(crate) fn prepare(&self, batches: Vec<Batch>) -> Group {
        let received = batches.into_iter().map(|batch| Received {
            batch,
            payload: None,
        });
        self.prepare_received(received.collect())
    }

    /// Copies the state of every gateway `batches` touch. Every batch's
    /// gateway must be known ([`Applier::knows`]).
    pub(crate) fn prepare_received(&self, batches: Vec<Received>) -> Group {
        let mut works: Vec<Work> = Vec::new();
        let mut indexed = Vec::with_capacity(batches.len());
        for received in batches {
            let batch = &received.batch;
            let index = match works.iter().position(|w| w.gateway == batch.gateway) {
                Some(index) => index,
                None => {
                    let state = &self.gateways[&batch.gateway];
                    works.push(Work {
                        gateway: batch.gateway.clone(),
                        site: state.site.clone(),
                        detector: state.detector.clone(),
                        last_seq: state.last_seq,
                        counters: GatewayCounters::default(),
                        duplicates: 0,
                        out_of_order: 0,
                        losses: Vec::new(),
                    });
                    works.len() - 1
                }
            };
            indexed.push((index, received));
        }
        Group {
            works,
            batches: indexed,
            store: self.store.clone(),
            webhooks: self.webhooks.clone(),
            influx: self.influx,
        }
    }

    /// Makes a committed group's copies the live states. Does nothing for
    /// a group whose commit failed.
    pub(crate) fn install(&mut self, outcome: &GroupOutcome) {
        if outcome.committed.is_err() {
            return;
        }
        for work in &outcome.works {
            let state = self
                .gateways
                .get_mut(&work.gateway)
                .expect("works are made for known gateways");
            state.detector = work.detector.clone();
            state.last_seq = work.last_seq;
        }
    }

    /// Prepares, applies and installs a group on the calling thread.
    #[cfg(test)]
    pub(crate) fn apply_now(&mut self, batches: Vec<Batch>, wall_now_ms: i64) -> GroupOutcome {
        let lag_ms = NoticeSettings::default().historical_lag.as_millis() as i64;
        let outcome = self.prepare(batches).apply(wall_now_ms, lag_ms);
        self.install(&outcome);
        outcome
    }
}

impl Group {
    /// Applies the group's batches to the copies and commits the result in
    /// one transaction, with the notices of its event changes (an event
    /// lagging wall time by more than `historical_lag_ms` is historical).
    /// Blocking (detector work and an fsync).
    pub(crate) fn apply(self, wall_now_ms: i64, historical_lag_ms: i64) -> GroupOutcome {
        let Group {
            mut works,
            batches,
            store,
            webhooks,
            influx,
        } = self;
        let mut events: Vec<Produced> = Vec::new();
        let mut readings = Pending::default();
        for (index, Received { batch, payload }) in batches {
            let work = &mut works[index];
            let seq = batch.seq;
            if work.last_seq.is_some_and(|last| seq <= last) {
                work.duplicates += 1;
                continue;
            }
            let batches_missing = work.last_seq.map_or(0, |last| seq - last - 1);
            if batches_missing > 0 && batch.dropped_before == 0 {
                // Batches in between went astray (a broker dropped them):
                // the gateway still holds them. Applying this one would ack
                // them away, so ask for a resend from last_seq + 1 instead.
                work.out_of_order += 1;
                continue;
            }
            let loss = DataLoss {
                samples_dropped: batch.dropped_before,
                batches_missing,
            };
            let produced = work.detector.apply_batch(&batch.samples, loss, wall_now_ms);
            let data_time_ms = work.detector.newest_sample_ms().unwrap_or(wall_now_ms);
            events.extend(produced.into_iter().map(|event| Produced {
                event,
                data_time_ms,
            }));
            if let Some(rendering) = influx.as_ref().filter(|r| r.readings) {
                readings.push_batch(&batch, payload.as_deref(), rendering.max_lines);
            }
            if !loss.is_none() {
                work.losses.push((seq, loss));
            }
            work.last_seq = Some(seq);
            let counters = &mut work.counters;
            counters.batches_applied += 1;
            counters.samples_applied += batch.samples.len() as u64;
            counters.sequence_gaps += u64::from(batches_missing > 0);
            counters.batches_missing += batches_missing;
            counters.samples_dropped_by_gateway += batch.dropped_before;
        }

        let snapshots: Vec<(usize, Vec<u8>)> = works
            .iter()
            .enumerate()
            .filter(|(_, w)| w.counters.batches_applied > 0)
            .map(|(i, w)| (i, w.detector.snapshot()))
            .collect();
        let committed = if snapshots.is_empty() {
            Ok(Committed::default())
        } else {
            let commits: Vec<GatewayCommit<'_>> = snapshots
                .iter()
                .map(|(i, snapshot)| {
                    let work = &works[*i];
                    GatewayCommit {
                        gateway: &work.gateway,
                        last_seq: work.last_seq.expect("a batch was applied"),
                        detector_snapshot: snapshot,
                        counters: work.counters,
                        site: &work.site,
                        newest_sample_ms: work.detector.newest_sample_ms(),
                    }
                })
                .collect();
            let notices = NoticeContext {
                webhooks: &webhooks,
                wall_now_ms,
                historical_lag_ms,
            };
            let influx = influx.as_ref().map(|rendering| InfluxCommit {
                rendering,
                readings: &readings,
            });
            store.commit_group(&commits, &events, notices, influx)
        };
        GroupOutcome { works, committed }
    }
}

/// The group being gathered while the one before it is applied: every
/// message is validated as it arrives.
#[derive(Default)]
struct Next {
    batches: Vec<Received>,
    /// The payloads' share of the queue's byte budget, given back when the
    /// group is done.
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Payload bytes taken, valid or not.
    bytes: usize,
    /// Messages taken (batches, valid or not, and connection notices).
    taken: usize,
    /// A (re)connection to the broker was among them.
    connected: bool,
}

impl Next {
    fn has_room(&self) -> bool {
        self.taken < MAX_GROUP_BATCHES && self.bytes < MAX_GROUP_BYTES
    }

    fn started(&self) -> bool {
        self.taken > 0
    }
}

/// A group on the blocking pool.
struct InFlight {
    task: tokio::task::JoinHandle<GroupOutcome>,
    count: u64,
    /// For the log if the task dies.
    gateways: Vec<String>,
    /// Held until the group is done.
    _permits: Vec<tokio::sync::OwnedSemaphorePermit>,
}

/// The async shell around [`Applier`]: receives, validates, applies groups
/// on the blocking pool, then acks and emits.
pub(crate) struct ApplyTask {
    applier: Applier,
    publisher: Publisher,
    stats: Arc<Stats>,
    rejects: RejectLog,
    /// Every known gateway's key: a batch is opened with its topic's.
    keys: Arc<HashMap<String, GatewayKey>>,
    clock: Clock,
    notices: NoticeSettings,
    /// Notified after every commit that queued webhook notices.
    outbox_changed: Arc<Notify>,
    /// The InfluxDB outbox's bound, when InfluxDB is written.
    influx: Option<InfluxGate>,
    /// Per gateway: when its last valid batch arrived, and its raised alert.
    liveness: HashMap<String, Liveness>,
    /// Gateways with a pending replay summary: when it last grew.
    replays: HashMap<String, Instant>,
}

/// Holds batches back while the InfluxDB outbox is full.
struct InfluxGate {
    max_outbox_bytes: u64,
    /// Notified after every commit that queued lines (wakes the writer).
    changed: Arc<Notify>,
    /// The outbox was full at the last group (for one log line per episode).
    full: bool,
}

struct Liveness {
    last_batch: Instant,
    /// Clock time of the last batch (or of the start), for `since`.
    last_batch_ms: i64,
    /// `since` of the raised `gateway_silent` alert.
    alert_since_ms: Option<i64>,
}

impl ApplyTask {
    /// Reads the raised alerts and pending replay summaries from the store:
    /// a restart neither raises an alert again nor loses a summary.
    pub(crate) fn new(
        applier: Applier,
        publisher: Publisher,
        keys: Arc<HashMap<String, GatewayKey>>,
        stats: Arc<Stats>,
        clock: Clock,
        notices: NoticeSettings,
        outbox_changed: Arc<Notify>,
    ) -> Result<ApplyTask, IngestError> {
        let now = Instant::now();
        let now_ms = clock.now_ms();
        let alerts: HashMap<String, i64> = applier.store.alerts()?.into_iter().collect();
        let liveness = applier
            .order
            .iter()
            .map(|gateway| {
                let state = Liveness {
                    last_batch: now,
                    last_batch_ms: now_ms,
                    alert_since_ms: alerts.get(gateway).copied(),
                };
                (gateway.clone(), state)
            })
            .collect();
        let replays = applier
            .store
            .pending_summaries()?
            .into_iter()
            .map(|summary| (summary.gateway, now))
            .collect();
        Ok(ApplyTask {
            applier,
            publisher,
            stats,
            rejects: RejectLog::default(),
            keys,
            clock,
            notices,
            outbox_changed,
            influx: None,
            liveness,
            replays,
        })
    }

    /// Applies no batch while the InfluxDB outbox holds `max_outbox_bytes`
    /// (the applier must render InfluxDB lines, see
    /// [`Applier::with_influx`]); wakes `changed` after every commit that
    /// queued lines.
    pub(crate) fn with_influx(mut self, max_outbox_bytes: u64, changed: Arc<Notify>) -> ApplyTask {
        self.influx = Some(InfluxGate {
            max_outbox_bytes,
            changed,
            full: false,
        });
        self
    }

    /// Whether the InfluxDB outbox has room for a group; logs when that
    /// changes.
    fn influx_has_room(&mut self) -> bool {
        let Some(gate) = &mut self.influx else {
            return true;
        };
        let bytes = self.applier.store.influx_outbox_bytes();
        let full = bytes >= gate.max_outbox_bytes;
        match (gate.full, full) {
            (false, true) => warn!(
                outbox_bytes = bytes,
                max_outbox_bytes = gate.max_outbox_bytes,
                "InfluxDB outbox is full: applying and acking no batch until it drains; the gateways keep their data."
            ),
            (true, false) => info!(
                outbox_bytes = bytes,
                "InfluxDB outbox has room again: applying batches."
            ),
            _ => {}
        }
        gate.full = full;
        !full
    }

    /// How often [`ApplyTask::tick`] runs: a quarter of the shortest of its
    /// delays, within 50 ms..5 s.
    fn tick_period(&self) -> Duration {
        (self.notices.silent_after.min(self.notices.replay_quiet) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// Applies groups until `shutdown` (the group being applied is
    /// finished; queued batches are left for the gateways to resend) or
    /// until the channel closes.
    pub(crate) async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        shutdown: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(self.tick_period());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight: Option<InFlight> = None;
        let mut next = Next::default();
        loop {
            if in_flight.is_none() && next.started() {
                // Everything queued behind joins the group.
                while next.has_room() {
                    match inbound.try_recv() {
                        Ok(message) => self.receive(&mut next, message).await,
                        Err(_) => break,
                    }
                }
                // A connection notice precedes the batches received on
                // that connection: ack with the committed state before
                // them, then apply them.
                if next.connected {
                    self.ack_every_gateway();
                }
                in_flight = self.start_group(std::mem::take(&mut next));
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                joined = async {
                    match in_flight.as_mut() {
                        Some(flight) => (&mut flight.task).await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_some() => {
                    let flight = in_flight.take().expect("the branch runs only with a group in flight");
                    self.finish_group(flight, joined).await;
                }
                message = inbound.recv(), if next.has_room() => match message {
                    Some(message) => {
                        self.receive(&mut next, message).await;
                        // And whatever came with it, without a select per
                        // message.
                        while next.has_room() {
                            match inbound.try_recv() {
                                Ok(message) => self.receive(&mut next, message).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = ticks.tick() => self.tick().await,
            }
        }
        // The group being applied is finished; the batches received after
        // it are left for the gateways to resend.
        if let Some(mut flight) = in_flight {
            let joined = (&mut flight.task).await;
            self.finish_group(flight, joined).await;
        }
    }

    /// Takes one message into the next group: a batch validated (and its
    /// gateway heard from), or a connection notice.
    async fn receive(&mut self, next: &mut Next, message: Inbound) {
        next.taken += 1;
        match message {
            Inbound::Batch(publish, permit) => {
                next.bytes += publish.payload.len();
                next.permits.push(permit);
                if let Some(received) = self.validate(publish) {
                    self.heard_from(std::slice::from_ref(&received)).await;
                    next.batches.push(received);
                }
            }
            Inbound::Connected => next.connected = true,
        }
    }

    /// The batch of a valid publish; rejects any other. In this order,
    /// cheapest first and nothing read that is not vouched for: the size,
    /// the topic's gateway (it must have a key), the tag under that key,
    /// and only then the decoding and the payload's gateway id.
    fn validate(&mut self, publish: Publish) -> Option<Received> {
        let gateway = topics::gateway_of_batch_topic(&publish.topic);
        let name = gateway.unwrap_or(&publish.topic);
        if publish.payload.len() > MAX_SEALED_BATCH_BYTES {
            let detail = format!(
                "payload of {} bytes exceeds the limit of {MAX_SEALED_BATCH_BYTES}",
                publish.payload.len()
            );
            self.reject(name, RejectReason::TooLarge, &detail);
            return None;
        }
        let (gateway, key) = match gateway.and_then(|gw| Some((gw, self.keys.get(gw)?))) {
            Some(known) => known,
            None => {
                let detail = format!("no loaded site has gateway `{}`", short_name(name));
                self.reject(name, RejectReason::UnknownGateway, &detail);
                return None;
            }
        };
        let message = match seal::open(key, Purpose::Batch, &publish.payload) {
            Ok(message) => message,
            Err(e) => {
                self.reject(gateway, RejectReason::BadMac, &e.to_string());
                return None;
            }
        };
        let batch = match Batch::decode(message) {
            Ok(batch) => batch,
            Err(e) => {
                self.reject(gateway, RejectReason::Decode, &e.to_string());
                return None;
            }
        };
        if batch.gateway != gateway {
            let detail = format!(
                "payload names gateway `{}`, topic names `{gateway}`",
                short_name(&batch.gateway)
            );
            self.reject(gateway, RejectReason::GatewayMismatch, &detail);
            return None;
        }
        let unsealed = publish.payload.slice(..message.len());
        Some(Received {
            batch,
            payload: Some(unsealed),
        })
    }

    /// Notes that `batches` arrived: each of their gateways is alive, and a
    /// raised alert is cleared (`gateway_back`).
    async fn heard_from(&mut self, batches: &[Received]) {
        let now = Instant::now();
        let now_ms = self.clock.now_ms();
        for Received { batch, .. } in batches {
            let Some(state) = self.liveness.get_mut(&batch.gateway) else {
                continue;
            };
            state.last_batch = now;
            state.last_batch_ms = now_ms;
            if let Some(since_ms) = state.alert_since_ms {
                let gateway = batch.gateway.clone();
                if self
                    .send_alert(AlertKind::GatewayBack, &gateway, since_ms, now_ms)
                    .await
                {
                    if let Some(state) = self.liveness.get_mut(&gateway) {
                        state.alert_since_ms = None;
                    }
                }
            }
        }
    }

    /// Raises silence alerts and completes quiet replay summaries.
    pub(crate) async fn tick(&mut self) {
        let now = Instant::now();
        let now_ms = self.clock.now_ms();
        let silent: Vec<(String, i64)> = self
            .liveness
            .iter()
            .filter(|(_, s)| {
                s.alert_since_ms.is_none()
                    && now.duration_since(s.last_batch) >= self.notices.silent_after
            })
            .map(|(gateway, s)| (gateway.clone(), s.last_batch_ms))
            .collect();
        for (gateway, since_ms) in silent {
            if self
                .send_alert(AlertKind::GatewaySilent, &gateway, since_ms, now_ms)
                .await
            {
                if let Some(state) = self.liveness.get_mut(&gateway) {
                    state.alert_since_ms = Some(since_ms);
                }
            }
        }

        let quiet: Vec<String> = self
            .replays
            .iter()
            .filter(|(_, grew)| now.duration_since(**grew) >= self.notices.replay_quiet)
            .map(|(gateway, _)| gateway.clone())
            .collect();
        for gateway in quiet {
            let store = self.applier.store.clone();
            let webhooks = self.applier.webhooks.clone();
            let flushed = {
                let gateway = gateway.clone();
                tokio::task::spawn_blocking(move || store.flush_summary(&gateway, &webhooks)).await
            };
            match flushed {
                Ok(Ok(flushed)) => {
                    self.replays.remove(&gateway);
                    if let Some((summary, queued)) = flushed {
                        self.count_queued(&queued);
                        self.summarised(summary).await;
                    }
                }
                Ok(Err(e)) => {
                    let site = self.applier.site_id(&gateway);
                    warn!(site, gateway, error = %e, "Replay summary not stored; retrying.");
                }
                Err(e) => {
                    let site = self.applier.site_id(&gateway);
                    warn!(site, gateway, error = %e, "Replay summary task failed; retrying.");
                }
            }
        }
    }

    /// Records the alert (raised with `since_ms`, or cleared) with its
    /// webhook notice, then logs and publishes it. Returns whether it was
    /// stored (if not, the next tick or batch tries again).
    async fn send_alert(
        &mut self,
        kind: AlertKind,
        gateway: &str,
        since_ms: i64,
        at_ms: i64,
    ) -> bool {
        let Some(site) = self.applier.gateways.get(gateway).map(|g| g.site.clone()) else {
            return false;
        };
        let alert = Alert {
            kind,
            site: site.id.clone(),
            gateway: gateway.to_string(),
            since_ms,
            at_ms,
            time_zone: site.time_zone,
        };
        let store = self.applier.store.clone();
        let webhooks = self.applier.webhooks.clone();
        let stored = {
            let gateway = gateway.to_string();
            let notice = alert.notice();
            let raised = (kind == AlertKind::GatewaySilent).then_some(since_ms);
            tokio::task::spawn_blocking(move || {
                store.set_alert(&gateway, raised, &notice, &webhooks)
            })
            .await
        };
        match stored {
            Ok(Ok(queued)) => {
                self.count_queued(&queued);
                match kind {
                    AlertKind::GatewaySilent => self.stats.add(|s| &s.alerts_raised, 1),
                    AlertKind::GatewayBack => self.stats.add(|s| &s.alerts_cleared, 1),
                }
                emit::emit_alert(&self.publisher, &alert);
                true
            }
            Ok(Err(e)) => {
                warn!(site = %site.id, gateway, error = %e, "Connectivity alert not stored.");
                false
            }
            Err(e) => {
                warn!(site = %site.id, gateway, error = %e, "Connectivity alert task failed.");
                false
            }
        }
    }

    /// Counts what a commit queued for the webhooks and wakes the senders.
    fn count_queued(&self, queued: &Queued) {
        if queued.notices > 0 {
            for webhook in self.applier.webhooks.iter() {
                self.stats
                    .add_webhook(&webhook.webhook, WebhookCounter::Queued, queued.notices);
            }
            self.outbox_changed.notify_waiters();
        }
        for (webhook, dropped) in &queued.dropped {
            warn!(webhook = %webhook, dropped, "Webhook outbox full; oldest notices dropped.");
            self.stats
                .add_webhook(webhook, WebhookCounter::DroppedFull, *dropped);
        }
    }

    async fn summarised(&mut self, summary: ReplaySummary) {
        self.replays.remove(&summary.gateway);
        self.stats.add(|s| &s.replay_summaries, 1);
        emit::emit_summary(&self.publisher, &summary);
    }

    /// Starts applying `next` on the blocking pool, or defers it while the
    /// InfluxDB outbox is full. The state it starts from must be installed:
    /// no group may be in flight.
    fn start_group(&mut self, next: Next) -> Option<InFlight> {
        let Next {
            batches, permits, ..
        } = next;
        let count = batches.len() as u64;
        if batches.is_empty() {
            return None;
        }
        if !self.influx_has_room() {
            // Not applied, so not acked: each gateway sends these again
            // after its ack timeout.
            self.stats.add(|s| &s.batches_deferred, count);
            return None;
        }
        // For the log if the apply task dies (the group is gone then).
        let mut gateways: Vec<String> = Vec::new();
        for Received { batch, .. } in &batches {
            if !gateways.contains(&batch.gateway) {
                gateways.push(batch.gateway.clone());
            }
        }
        let group = self.applier.prepare_received(batches);
        let now_ms = self.clock.now_ms();
        let lag_ms = self.notices.historical_lag.as_millis() as i64;
        Some(InFlight {
            task: tokio::task::spawn_blocking(move || group.apply(now_ms, lag_ms)),
            count,
            gateways,
            _permits: permits,
        })
    }

    /// Takes the outcome of the group in flight: installs its state, acks
    /// its gateways and emits its event changes.
    async fn finish_group(
        &mut self,
        flight: InFlight,
        joined: Result<GroupOutcome, tokio::task::JoinError>,
    ) {
        let InFlight {
            count, gateways, ..
        } = flight;
        let outcome = match joined {
            Ok(outcome) => outcome,
            Err(e) => {
                let sites: Vec<&str> = gateways
                    .iter()
                    .filter_map(|g| self.applier.site_id(g))
                    .collect();
                error!(?sites, ?gateways, batches = count, error = %e, "Applying a group of batches failed; not acking.");
                self.stats.add(|s| &s.apply_failures, count);
                return;
            }
        };
        for work in &outcome.works {
            self.stats.add(|s| &s.batches_duplicate, work.duplicates);
            self.stats
                .add(|s| &s.batches_out_of_order, work.out_of_order);
        }
        let committed = match &outcome.committed {
            Ok(committed) => committed,
            Err(e) => {
                let sites: Vec<&str> = outcome.works.iter().map(|w| w.site.id.as_str()).collect();
                let gateways: Vec<&str> =
                    outcome.works.iter().map(|w| w.gateway.as_str()).collect();
                error!(?sites, ?gateways, batches = count, error = %e, "Batches not committed; not acking.");
                self.stats
                    .add(|s| &s.apply_failures, outcome.batches_applied());
                return;
            }
        };
        let changes = &committed.changes;
        self.applier.install(&outcome);
        if outcome.batches_applied() > 0 {
            self.stats.add(|s| &s.groups_committed, 1);
        }

        for work in &outcome.works {
            let site = &work.site.id;
            let gateway = &work.gateway;
            if work.duplicates > 0 || work.out_of_order > 0 {
                debug!(site = %site, gateway, duplicates = work.duplicates, out_of_order = work.out_of_order, last_seq = ?work.last_seq, "Batches not applied; acking last_seq again.");
            }
            for (seq, loss) in &work.losses {
                if loss.batches_missing > 0 {
                    warn!(
                        site = %site,
                        gateway,
                        seq,
                        batches_missing = loss.batches_missing,
                        "Sequence gap: batches {}..={} never arrived.",
                        seq - loss.batches_missing,
                        seq - 1
                    );
                }
                warn!(site = %site, gateway, seq, samples_dropped = loss.samples_dropped, "The gateway discarded samples before this batch.");
            }
            let counters = work.counters;
            self.stats
                .add(|s| &s.batches_applied, counters.batches_applied);
            self.stats
                .add(|s| &s.samples_applied, counters.samples_applied);
            self.stats.add(|s| &s.sequence_gaps, counters.sequence_gaps);
        }
        let opened = changes.iter().filter(|c| c.opened).count() as u64;
        let closed = changes.iter().filter(|c| c.closed).count() as u64;
        let interruptions = changes
            .iter()
            .filter(|c| c.opened && c.event.rule == Rule::R5)
            .count() as u64;
        self.stats.add(|s| &s.events_opened, opened);
        self.stats.add(|s| &s.events_closed, closed);
        for change in changes {
            self.stats
                .count_event_change(change.event.rule, change.opened, change.closed);
        }
        self.stats.add(|s| &s.data_interruptions, interruptions);
        let historical = changes.iter().filter(|c| c.historical_notice).count() as u64;
        self.stats.add(|s| &s.notices_historical, historical);
        self.count_queued(&committed.queued);
        if committed.influx_lines > 0 {
            self.stats
                .add(|s| &s.influx_lines_queued, committed.influx_lines);
            if let Some(gate) = &self.influx {
                gate.changed.notify_waiters();
            }
        }
        let now = Instant::now();
        for change in changes.iter().filter(|c| c.historical_notice && c.opened) {
            self.replays.insert(change.event.gateway.clone(), now);
        }

        for work in &outcome.works {
            if let Some(seq) = work.last_seq {
                self.ack(&work.gateway, seq);
            }
        }
        for change in changes {
            let work = outcome
                .works
                .iter()
                .find(|w| w.gateway == change.event.gateway)
                .expect("events come from the group's gateways");
            emit::emit(&self.publisher, &work.site, change);
        }
        for summary in committed.summaries.clone() {
            self.summarised(summary).await;
        }
    }

    fn ack_every_gateway(&self) {
        for (gateway, seq) in self.applier.acks() {
            self.ack(&gateway, seq);
        }
    }

    fn ack(&self, gateway: &str, seq: u64) {
        self.publisher.ack(gateway, seq);
    }

    fn reject(&mut self, gateway: &str, reason: RejectReason, detail: &str) {
        self.stats.add(
            |s| match reason {
                RejectReason::TooLarge => &s.rejected_too_large,
                RejectReason::BadMac => &s.rejected_bad_mac,
                RejectReason::Decode => &s.rejected_decode,
                RejectReason::UnknownGateway => &s.rejected_unknown_gateway,
                RejectReason::GatewayMismatch => &s.rejected_gateway_mismatch,
            },
            1,
        );
        if let Some(suppressed) = self
            .rejects
            .record(gateway, reason, tokio::time::Instant::now())
        {
            let site = self.applier.site_id(gateway);
            warn!(
                site,
                gateway = %short_name(gateway),
                reason = reason.as_str(),
                suppressed,
                "Batch rejected: {detail}."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{Event, EventStatus, ALL_LINES};
    use facwatch_proto::wire::{Quality, Sample, Values};

    const TWO_GATEWAYS: &str = r#"
[site]
id = "plant"
time_zone = "Asia/Shanghai"

[[gateways]]
id = "gw-a"

[[gateways]]
id = "gw-b"

[[meters]]
id = "a-stenter"
gateway = "gw-a"
profile = "sdm630"
tcp = "127.0.0.1:5020"
unit = 1

[[meters]]
id = "a-fan"
gateway = "gw-a"
profile = "sdm630"
tcp = "127.0.0.1:5020"
unit = 2

[[meters]]
id = "b-stenter"
gateway = "gw-b"
profile = "sdm630"
tcp = "127.0.0.1:5021"
unit = 2

[[meters]]
id = "b-fan"
gateway = "gw-b"
profile = "sdm630"
tcp = "127.0.0.1:5021"
unit = 1

[[lines]]
id = "line-a"

[[lines.facilities]]
id = "a-stenter"
kind = "stenter"
meter = "a-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "a-fan"
kind = "main_fan"
meter = "a-fan"
rated_kw = 22
start_threshold_kw = 4

[[lines]]
id = "line-b"

[[lines.facilities]]
id = "b-stenter"
kind = "stenter"
meter = "b-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "b-fan"
kind = "main_fan"
meter = "b-fan"
rated_kw = 22
start_threshold_kw = 4
"#;

    /// 2022-12-13 09:00 in Asia/Shanghai.
    const NINE_AM_MS: i64 = 1_670_893_200_000;
    const MINUTE_MS: i64 = 60_000;

    fn sample(meter: &str, time_ms: i64, power_kw: f32) -> Sample {
        Sample {
            meter: meter.into(),
            time_ms,
            quality: Quality::Ok,
            values: Values {
                power_kw: Some(power_kw),
                ..Values::default()
            },
        }
    }

    fn batch(gateway: &str, seq: u64, dropped_before: u64) -> Batch {
        let meter = if gateway == "gw-a" { "a-fan" } else { "b-fan" };
        Batch {
            gateway: gateway.into(),
            seq,
            dropped_before,
            samples: vec![sample(meter, NINE_AM_MS + seq as i64 * MINUTE_MS, 10.0)],
        }
    }

    fn applier(site_toml: &str, dir: &tempfile::TempDir) -> (Applier, Arc<Store>) {
        let site = Site::from_toml(site_toml, "test.site.toml").unwrap();
        let store = Arc::new(Store::open(&dir.path().join("ingest.redb")).unwrap());
        (
            Applier::new(&[site], store.clone(), Vec::new()).unwrap(),
            store,
        )
    }

    fn acks(applier: &Applier) -> Vec<(&str, u64)> {
        applier
            .order
            .iter()
            .map(|g| (g.as_str(), applier.gateways[g].last_seq.unwrap_or(0)))
            .collect()
    }

    #[test]
    fn a_group_applies_the_seq_rules_against_its_running_last_seq_and_commits_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut applier, store) = applier(TWO_GATEWAYS, &dir);
        let group = vec![
            batch("gw-a", 1, 0),
            batch("gw-a", 2, 0),
            batch("gw-a", 2, 0), // duplicate inside the group
            batch("gw-b", 1, 0),
            batch("gw-a", 4, 0), // 3 not seen yet: out of order
            batch("gw-a", 3, 0),
            batch("gw-b", 1, 0), // duplicate
        ];
        let outcome = applier.apply_now(group, 0);
        assert_eq!(outcome.committed.as_ref().unwrap().changes, vec![]);
        let summary: Vec<_> = outcome
            .works
            .iter()
            .map(|w| {
                (
                    w.gateway.as_str(),
                    w.last_seq,
                    w.counters.batches_applied,
                    w.duplicates,
                    w.out_of_order,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![("gw-a", Some(3), 3, 1, 1), ("gw-b", Some(1), 1, 1, 0)]
        );
        assert_eq!(outcome.batches_applied(), 4);
        assert_eq!(acks(&applier), vec![("gw-a", 3), ("gw-b", 1)]);
        assert_eq!(
            applier.acks(),
            vec![("gw-a".to_string(), 3), ("gw-b".to_string(), 1)]
        );
        assert_eq!(store.last_seq("gw-a").unwrap(), Some(3));
        assert_eq!(store.last_seq("gw-b").unwrap(), Some(1));
        assert_eq!(store.counters("gw-a").unwrap().samples_applied, 3);

        // The batch that was out of order applies once its turn has come.
        let outcome = applier.apply_now(vec![batch("gw-a", 4, 0)], 0);
        assert_eq!(outcome.works[0].last_seq, Some(4));
        assert_eq!(store.last_seq("gw-a").unwrap(), Some(4));
    }

    #[test]
    fn a_failed_commit_changes_nothing_and_the_resend_applies_as_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut applier, store) = applier(TWO_GATEWAYS, &dir);
        let group = || {
            vec![
                batch("gw-a", 1, 0),
                batch("gw-b", 1, 0),
                batch("gw-a", 2, 0),
            ]
        };

        store.fail_next_commit();
        let failed = applier.apply_now(group(), 0);
        assert!(failed.committed.is_err());
        assert_eq!(acks(&applier), vec![("gw-a", 0), ("gw-b", 0)]);
        assert_eq!(applier.gateways["gw-a"].detector.newest_sample_ms(), None);
        assert_eq!(store.last_seq("gw-a").unwrap(), None);
        assert_eq!(store.detector_snapshot("gw-a").unwrap(), None);

        let resent = applier.apply_now(group(), 0);
        assert!(resent.committed.is_ok());
        assert_eq!(resent.batches_applied(), 3);
        assert_eq!(acks(&applier), vec![("gw-a", 2), ("gw-b", 1)]);
        assert_eq!(store.counters("gw-a").unwrap().batches_applied, 2);
        assert_eq!(
            applier.gateways["gw-a"].detector.newest_sample_ms(),
            Some(NINE_AM_MS + 2 * MINUTE_MS)
        );
    }

    /// Stored events, last_seq, counters and detector snapshot after
    /// applying `batches` in groups of `size`.
    fn applied_in_groups(
        batches: &[Batch],
        size: usize,
    ) -> (Vec<Event>, Option<u64>, GatewayCounters, Option<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let (mut applier, store) = applier(crate::bench::SITE, &dir);
        for chunk in batches.chunks(size) {
            let outcome = applier.apply_now(chunk.to_vec(), 0);
            assert!(outcome.committed.is_ok());
        }
        (
            store.events().unwrap(),
            store.last_seq("gw-01").unwrap(),
            store.counters("gw-01").unwrap(),
            store.detector_snapshot("gw-01").unwrap(),
        )
    }

    #[test]
    fn grouping_changes_neither_the_events_nor_the_stored_state() {
        // 60 batches of 60 polls: 30 hours of the plant, with R1 intervals.
        let mut batches: Vec<Batch> = (1..=60)
            .map(|seq| crate::bench::plant_batch(seq, 60))
            .collect();
        // A loss in the middle: batches 31 and 32 discarded.
        batches.retain(|b| b.seq != 31 && b.seq != 32);
        batches[30].dropped_before = 1200;
        // And resends of earlier batches.
        batches.insert(10, batches[8].clone());
        let one_by_one = applied_in_groups(&batches, 1);
        assert!(one_by_one.0.len() > 5, "the history has events");
        assert_eq!(
            one_by_one.0.iter().filter(|e| e.rule == Rule::R5).count(),
            1
        );
        assert_eq!(one_by_one.1, Some(60));
        for size in [2, 7, 64] {
            assert_eq!(
                applied_in_groups(&batches, size),
                one_by_one,
                "groups of {size}"
            );
        }
    }

    #[test]
    fn discarded_samples_after_a_seq_gap_give_one_exact_r5_event() {
        let dir = tempfile::tempdir().unwrap();
        let (mut applier, store) = applier(crate::bench::SITE, &dir);
        let first = Batch {
            gateway: "gw-01".into(),
            seq: 1,
            dropped_before: 0,
            samples: vec![
                sample("l1-stenter", NINE_AM_MS - 30_000, 100.0),
                sample("l1-main-fan", NINE_AM_MS, 18.0),
            ],
        };
        applier.apply_now(vec![first], NINE_AM_MS);
        // Batches 2..=4 never came; the gateway discarded 1,234 samples.
        let half_past_eleven = NINE_AM_MS + 150 * MINUTE_MS;
        let after_loss = Batch {
            gateway: "gw-01".into(),
            seq: 5,
            dropped_before: 1234,
            samples: vec![
                sample("l2-stenter", half_past_eleven, 100.0),
                sample("l1-stenter", half_past_eleven + 5, 100.0),
            ],
        };
        // The first attempt does not commit; the resend gives the event.
        store.fail_next_commit();
        let failed = applier.apply_now(vec![after_loss.clone()], half_past_eleven + MINUTE_MS);
        assert!(failed.committed.is_err());
        assert_eq!(store.events().unwrap(), vec![]);
        let outcome = applier.apply_now(vec![after_loss], half_past_eleven + MINUTE_MS);
        let changes = outcome.committed.unwrap().changes;
        assert_eq!(changes.len(), 1);
        assert!(changes[0].opened && changes[0].closed);

        let expected = Event {
            id: crate::detect::event_id("tx-dyeing", "gw-01/*", Rule::R5, NINE_AM_MS),
            site: "tx-dyeing".into(),
            gateway: "gw-01".into(),
            line: ALL_LINES.into(),
            rule: Rule::R5,
            status: EventStatus::Closed,
            start_ms: NINE_AM_MS,
            end_ms: Some(half_past_eleven),
            facilities: [
                "l1-condenser", "l1-hv-esp", "l1-main-fan", "l1-spray-pump", "l1-stenter",
                "l2-condenser", "l2-hv-esp", "l2-main-fan", "l2-spray-pump", "l2-stenter",
            ]
            .map(String::from)
            .to_vec(),
            historical: false,
            notice_en: "Tongxiang Example Dyeing & Finishing Co.: data interruption. Gateway gw-01 discarded 1,234 readings (buffer full) between 2022-12-13 09:00 and 2022-12-13 11:30; 3 batches are missing. These readings cannot be recovered.".into(),
            notice_zh: "Tongxiang Example Dyeing & Finishing Co.：工况数据缺失。网关gw-01缓存已满，2022-12-13 09:00至2022-12-13 11:30期间丢弃1,234条读数，缺失3个批次，无法补传。".into(),
            data_loss: Some(DataLoss {
                samples_dropped: 1234,
                batches_missing: 3,
            }),
            evidence: Default::default(),
        };
        assert_eq!(changes[0].event, expected);
        assert_eq!(expected.id, "bf8972fc68b782cbcba3f57e3985f8bb");
        assert_eq!(store.events().unwrap(), vec![expected.clone()]);
        let counters = store.counters("gw-01").unwrap();
        assert_eq!(
            (
                counters.sequence_gaps,
                counters.batches_missing,
                counters.samples_dropped_by_gateway
            ),
            (1, 3, 1234)
        );

        let json = expected.to_json(chrono_tz::Asia::Shanghai);
        assert_eq!(
            json,
            serde_json::json!({
                "id": "bf8972fc68b782cbcba3f57e3985f8bb",
                "site": "tx-dyeing",
                "gateway": "gw-01",
                "line": "*",
                "rule": "R5",
                "status": "closed",
                "start": "2022-12-13T09:00:00+08:00",
                "end": "2022-12-13T11:30:00+08:00",
                "duration_secs": 9000,
                "facilities": [
                    "l1-condenser", "l1-hv-esp", "l1-main-fan", "l1-spray-pump", "l1-stenter",
                    "l2-condenser", "l2-hv-esp", "l2-main-fan", "l2-spray-pump", "l2-stenter"
                ],
                "historical": false,
                "evidence": {},
                "notice": {
                    "en": "Tongxiang Example Dyeing & Finishing Co.: data interruption. Gateway gw-01 discarded 1,234 readings (buffer full) between 2022-12-13 09:00 and 2022-12-13 11:30; 3 batches are missing. These readings cannot be recovered.",
                    "zh": "Tongxiang Example Dyeing & Finishing Co.：工况数据缺失。网关gw-01缓存已满，2022-12-13 09:00至2022-12-13 11:30期间丢弃1,234条读数，缺失3个批次，无法补传。"
                },
                "samples_dropped": 1234,
                "batches_missing": 3
            })
        );
    }
}

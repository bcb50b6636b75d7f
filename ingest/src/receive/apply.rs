//! The apply task: every batch exactly once, in `seq` order per gateway.
//!
//! Per batch, in this order:
//! 1. The topic's gateway must belong to a loaded site, the payload must
//!    decode, and the payload's gateway must equal the topic's; otherwise
//!    the batch is rejected: counted by reason, logged at a limited rate,
//!    and dropped without an ack. Nothing about it can stop other gateways.
//! 2. `seq <= last_seq[gw]`: a duplicate (the gateway resent because it
//!    missed the ack). Ignored, and `Ack { last_seq }` is published again.
//! 3. Otherwise the detector applies the samples **on a copy** of its state,
//!    and one store transaction writes `last_seq`, the copy's snapshot, the
//!    events and the counters. Only after the commit does the copy replace
//!    the live state, is `Ack { seq }` published (retained) and are the
//!    changed events emitted. If the commit fails nothing changed: no ack,
//!    and the gateway's resend is applied as if it were the first.
//!
//! A `seq` above `last_seq + 1` is applied only when the batch says the
//! gateway discarded data before it (`dropped_before > 0`), and is then
//! recorded as a gap (warning, counters). Otherwise the batches in between
//! are still in the gateway's buffer: the batch is ignored and
//! `Ack { last_seq }` published again, so the gateway resends from
//! `last_seq + 1` and nothing is acked away unseen. Before a gateway's first
//! applied batch no gap is computed.

use std::collections::HashMap;
use std::sync::Arc;

use facwatch_proto::clock::Clock;
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Ack, Batch};
use rumqttc::Publish;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::reject::{short_name, RejectLog, RejectReason};
use crate::detect::GatewayDetector;
use crate::emit::{self, Publisher};
use crate::stats::Stats;
use crate::store::{AppliedBatch, Store};
use crate::IngestError;

struct GatewayState {
    site: Arc<Site>,
    detector: GatewayDetector,
    last_seq: Option<u64>,
}

pub(crate) struct Applier {
    gateways: HashMap<String, GatewayState>,
    store: Arc<Store>,
    publisher: Publisher,
    stats: Arc<Stats>,
    rejects: RejectLog,
    clock: Clock,
}

impl Applier {
    /// Restores every gateway's detector and `last_seq` from the store.
    pub(crate) fn new(
        sites: &[Site],
        store: Arc<Store>,
        publisher: Publisher,
        stats: Arc<Stats>,
        clock: Clock,
    ) -> Result<Applier, IngestError> {
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
            gateways,
            store,
            publisher,
            stats,
            rejects: RejectLog::default(),
            clock,
        })
    }

    /// Applies batches until `shutdown` (the batch being applied is
    /// finished; queued ones are left for the gateways to resend) or until
    /// the channel closes.
    pub(crate) async fn run(
        mut self,
        mut batches: mpsc::Receiver<Publish>,
        shutdown: CancellationToken,
    ) {
        loop {
            let publish = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                publish = batches.recv() => match publish {
                    Some(publish) => publish,
                    None => return,
                },
            };
            self.handle(publish).await;
        }
    }

    async fn handle(&mut self, publish: Publish) {
        let gateway = match topics::gateway_of_batch_topic(&publish.topic) {
            Some(gw) if self.gateways.contains_key(gw) => gw.to_string(),
            other => {
                let name = other.unwrap_or(&publish.topic);
                let detail = format!("no loaded site has gateway `{}`", short_name(name));
                self.reject(name, RejectReason::UnknownGateway, &detail);
                return;
            }
        };
        let batch = match Batch::decode(&publish.payload) {
            Ok(batch) => batch,
            Err(e) => {
                self.reject(&gateway, RejectReason::Decode, &e.to_string());
                return;
            }
        };
        if batch.gateway != gateway {
            let detail = format!(
                "payload names gateway `{}`, topic names `{gateway}`",
                short_name(&batch.gateway)
            );
            self.reject(&gateway, RejectReason::GatewayMismatch, &detail);
            return;
        }
        self.apply(gateway, batch).await;
    }

    async fn apply(&mut self, gateway: String, batch: Batch) {
        let state = self
            .gateways
            .get_mut(&gateway)
            .expect("handle checked the gateway");
        let site = state.site.clone();
        let seq = batch.seq;

        if let Some(last) = state.last_seq.filter(|last| seq <= *last) {
            debug!(site = %site.id, gateway, seq, last_seq = last, "Duplicate batch; acking again.");
            self.stats.add(|s| &s.batches_duplicate, 1);
            self.ack(&gateway, last).await;
            return;
        }

        let batches_missing = state.last_seq.map_or(0, |last| seq - last - 1);
        if batches_missing > 0 && batch.dropped_before == 0 {
            // Batches in between went astray (a broker dropped them): the
            // gateway still holds them. Applying this one would ack them
            // away, so ask for a resend from last_seq + 1 instead.
            debug!(site = %site.id, gateway, seq, last_seq = ?state.last_seq, "Batch out of order; acking last_seq again.");
            self.stats.add(|s| &s.batches_out_of_order, 1);
            let last = state.last_seq.expect("a gap needs a last_seq");
            self.ack(&gateway, last).await;
            return;
        }
        let samples = batch.samples.len() as u64;
        let dropped_before = batch.dropped_before;
        let mut detector = state.detector.clone();
        let store = self.store.clone();
        let job_gateway = gateway.clone();
        let now_ms = self.clock.now_ms();
        let outcome = tokio::task::spawn_blocking(move || {
            let events = detector.apply(&batch.samples, now_ms);
            let snapshot = detector.snapshot();
            let committed = store.commit_batch(&AppliedBatch {
                gateway: &job_gateway,
                seq,
                samples,
                dropped_before,
                batches_missing,
                detector_snapshot: &snapshot,
                events: &events,
            });
            (detector, committed)
        })
        .await;

        let changes = match outcome {
            Ok((detector, Ok(changes))) => {
                state.detector = detector;
                state.last_seq = Some(seq);
                changes
            }
            Ok((_, Err(e))) => {
                error!(site = %site.id, gateway, seq, error = %e, "Batch not committed; not acking.");
                self.stats.add(|s| &s.apply_failures, 1);
                return;
            }
            Err(e) => {
                error!(site = %site.id, gateway, seq, error = %e, "Applying the batch failed; not acking.");
                self.stats.add(|s| &s.apply_failures, 1);
                return;
            }
        };

        if batches_missing > 0 {
            warn!(
                site = %site.id,
                gateway,
                expected_seq = seq - batches_missing,
                seq,
                batches_missing,
                "Sequence gap: batches {}..={} never arrived.",
                seq - batches_missing,
                seq - 1
            );
            self.stats.add(|s| &s.sequence_gaps, 1);
        }
        if dropped_before > 0 {
            warn!(site = %site.id, gateway, seq, samples_dropped = dropped_before, "The gateway discarded samples before this batch.");
        }
        self.stats.add(|s| &s.samples_applied, samples);
        let opened = changes.iter().filter(|c| c.opened).count() as u64;
        let closed = changes.iter().filter(|c| c.closed).count() as u64;
        self.stats.add(|s| &s.events_opened, opened);
        self.stats.add(|s| &s.events_closed, closed);
        self.stats.add(|s| &s.batches_applied, 1);

        self.ack(&gateway, seq).await;
        for change in &changes {
            emit::emit(&self.publisher, &site, change).await;
        }
    }

    async fn ack(&self, gateway: &str, seq: u64) {
        self.publisher
            .publish(topics::ack(gateway), true, Ack { seq }.encode())
            .await;
    }

    fn reject(&mut self, gateway: &str, reason: RejectReason, detail: &str) {
        self.stats.add(
            |s| match reason {
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
            let site = self.gateways.get(gateway).map(|g| g.site.id.as_str());
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

//! `GET /api/v1/sites/{site}/status`: what one site looks like now, from
//! the committed store.
//!
//! Per gateway: its `last_seq`, the newest sample it delivered and its open
//! whole-gateway events (line `*`); per line: each facility's state, last
//! power and the time of that reading, and the line's open events (those
//! about one meter of it included). Facilities come from the detector
//! snapshot committed with the gateway's `last_seq` (restored exactly as
//! the ingest restores it after a restart); a gateway with no snapshot yet
//! shows its facilities `unknown` with nulls.
//!
//! Invariant: the answer shows one committed point of the site. The store
//! reads are separate read transactions, so [`read`] takes the site's
//! `last_seq`s before and after them and reads again (up to
//! [`MAX_READS`] times) if a commit of one of its gateways fell in
//! between: every commit that changes a gateway's snapshot or events moves
//! its `last_seq`. Times are RFC 3339 in the site's zone, as in events.

use std::sync::Arc;

use facwatch_proto::site::{FacilityKind, Role, Site};
use serde_json::{json, Value};

use crate::detect::{self, Event, EventStatus, GatewayDetector, SnapshotError, State};
use crate::{Store, StoreError};

/// Reads before [`read`] settles for the last one even though a commit
/// fell between its reads (under a steady stream of commits).
const MAX_READS: usize = 3;

/// What the store holds about one gateway of the site.
pub(crate) struct GatewayState {
    pub(crate) gateway: String,
    pub(crate) last_seq: Option<u64>,
    pub(crate) detector: GatewayDetector,
}

/// The site's committed state, read by [`read`].
pub(crate) struct SiteState {
    /// In site-file order of the gateways.
    pub(crate) gateways: Vec<GatewayState>,
    /// The site's open events, in any order.
    pub(crate) open_events: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gateway `{gateway}`: stored {source}")]
    Snapshot {
        gateway: String,
        source: SnapshotError,
    },
}

/// Reads `site`'s state from `store` (blocking: run it on the blocking
/// pool).
pub(crate) fn read(store: &Store, site: &Arc<Site>) -> Result<SiteState, StatusError> {
    let last_seqs = || -> Result<Vec<Option<u64>>, StoreError> {
        site.gateways
            .iter()
            .map(|g| store.last_seq(&g.id))
            .collect()
    };
    let mut before = last_seqs()?;
    let mut reads = 0;
    loop {
        reads += 1;
        let mut gateways = Vec::with_capacity(site.gateways.len());
        for gateway in &site.gateways {
            let detector = match store.detector_snapshot(&gateway.id)? {
                Some(snapshot) => GatewayDetector::restore(site.clone(), &gateway.id, &snapshot)
                    .map_err(|source| StatusError::Snapshot {
                        gateway: gateway.id.clone(),
                        source,
                    })?,
                None => GatewayDetector::new(site.clone(), &gateway.id),
            };
            gateways.push(GatewayState {
                gateway: gateway.id.clone(),
                last_seq: None,
                detector,
            });
        }
        let open_events: Vec<Event> = store
            .events()?
            .into_iter()
            .filter(|e| e.site == site.id && e.status == EventStatus::Open)
            .collect();
        let after = last_seqs()?;
        if after == before || reads == MAX_READS {
            for (state, last_seq) in gateways.iter_mut().zip(&after) {
                state.last_seq = *last_seq;
            }
            return Ok(SiteState {
                gateways,
                open_events,
            });
        }
        before = after;
    }
}

/// The JSON answer for `site` in `state` (pure).
pub(crate) fn render(site: &Site, state: &SiteState) -> Value {
    let tz = site.time_zone;
    let time = |ms: Option<i64>| ms.map(|ms| detect::rfc3339(ms, tz));
    // Newest first by (start, id), the order of /api/v1/events.
    let mut open: Vec<&Event> = state.open_events.iter().collect();
    open.sort_by(|a, b| (b.start_ms, &b.id).cmp(&(a.start_ms, &a.id)));
    let events_where = |keep: &dyn Fn(&Event) -> bool| -> Vec<Value> {
        open.iter()
            .filter(|e| keep(e))
            .map(|e| e.to_json(tz))
            .collect()
    };
    let gateways: Vec<Value> = state
        .gateways
        .iter()
        .map(|g| {
            json!({
                "id": g.gateway,
                "last_seq": g.last_seq,
                "newest_sample_time": time(g.detector.newest_sample_ms()),
                "open_events": events_where(&|e| {
                    e.gateway == g.gateway && e.line == detect::ALL_LINES
                }),
            })
        })
        .collect();
    let statuses: Vec<detect::FacilityStatus> = state
        .gateways
        .iter()
        .flat_map(|g| g.detector.facility_statuses())
        .collect();
    let lines: Vec<Value> = site
        .lines
        .iter()
        .map(|line| {
            let facilities: Vec<Value> = line
                .facilities
                .iter()
                .map(|f| {
                    let status = statuses
                        .iter()
                        .find(|s| s.line == line.id && s.facility == f.id);
                    json!({
                        "id": f.id,
                        "name": f.name,
                        "kind": kind_name(f.kind),
                        "role": match f.role() {
                            Role::Production => "production",
                            Role::Treatment => "treatment",
                        },
                        "state": state_name(status.map_or(State::Unknown, |s| s.state)),
                        "last_power_kw": status.and_then(|s| s.last_power_kw).map(crate::detect::kw_json),
                        "last_sample_time": time(status.and_then(|s| s.last_sample_ms)),
                    })
                })
                .collect();
            json!({
                "id": line.id,
                "name": line.name,
                "gateway": site.gateway_of_line(line),
                "facilities": facilities,
                "open_events": events_where(&|e| e.line == line.id),
            })
        })
        .collect();
    json!({
        "site": site.id,
        "name": site.name,
        "time_zone": site.time_zone.name(),
        "gateways": gateways,
        "lines": lines,
    })
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Unknown => "unknown",
        State::Running => "running",
        State::Stopped => "stopped",
        State::LowLoad => "low_load",
    }
}

/// The site file's name of a kind (its serde name).
pub(crate) fn kind_name(kind: FacilityKind) -> &'static str {
    match kind {
        FacilityKind::Stenter => "stenter",
        FacilityKind::Boiler => "boiler",
        FacilityKind::Production => "production",
        FacilityKind::MainFan => "main_fan",
        FacilityKind::Condenser => "condenser",
        FacilityKind::HvEsp => "hv_esp",
        FacilityKind::SprayPump => "spray_pump",
        FacilityKind::Treatment => "treatment",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_the_site_file_names() {
        for kind in [
            FacilityKind::Stenter,
            FacilityKind::Boiler,
            FacilityKind::Production,
            FacilityKind::MainFan,
            FacilityKind::Condenser,
            FacilityKind::HvEsp,
            FacilityKind::SprayPump,
            FacilityKind::Treatment,
        ] {
            let parsed: FacilityKind = serde_json::from_value(json!(kind_name(kind))).unwrap();
            assert_eq!(parsed, kind);
        }
    }
}

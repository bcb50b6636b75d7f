//! Detector tables: a plant history in, the exact events out.

use super::*;
use facility::FacilityState;
use facwatch_proto::wire::{Quality, Values};

const SITE: &str = r#"
[site]
id = "plant"
name = "Demo Dyeing"

[[gateways]]
id = "gw"
poll_interval_secs = 30

[rules.r1]
min_duration_secs = 600
clear_duration_secs = 120

[[meters]]
id = "m-stenter"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:502"
unit = 1

[[meters]]
id = "m-pump"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:502"
unit = 2

[[meters]]
id = "m-condenser"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:502"
unit = 3

[[meters]]
id = "m-esp"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:502"
unit = 4

[[meters]]
id = "m-fan"
gateway = "gw"
profile = "sdm630"
tcp = "127.0.0.1:502"
unit = 5

[[lines]]
id = "line1"
name = "Stenter line 1"

[[lines.facilities]]
id = "stenter"
kind = "stenter"
meter = "m-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "pump"
kind = "spray_pump"
meter = "m-pump"
rated_kw = 5.5
start_threshold_kw = 1
critical = false

[[lines.facilities]]
id = "condenser"
kind = "condenser"
meter = "m-condenser"
rated_kw = 7.5
start_threshold_kw = 1.5

[[lines.facilities]]
id = "esp"
kind = "hv_esp"
meter = "m-esp"
rated_kw = 10
start_threshold_kw = 0.8

[[lines.facilities]]
id = "fan"
kind = "main_fan"
meter = "m-fan"
rated_kw = 22
start_threshold_kw = 4
"#;

/// 2022-12-13T00:00:00+08:00.
const DAY_MS: i64 = 1_670_860_800_000;
const POLL_MS: i64 = 30_000;

fn site() -> Arc<Site> {
    Arc::new(Site::from_toml(SITE, "test.site.toml").unwrap())
}

fn hm(h: i64, m: i64) -> i64 {
    DAY_MS + (h * 60 + m) * 60_000
}

/// What a meter shows at a time: a power, or a failed poll.
#[derive(Clone, Copy)]
enum Reading {
    Kw(f32),
    Timeout,
}

/// Polls every meter every 30 s from `from` to `to`, asking `plant` what
/// each shows.
fn history(from: i64, to: i64, plant: impl Fn(&str, i64) -> Reading) -> Vec<Sample> {
    let meters = ["m-stenter", "m-pump", "m-condenser", "m-esp", "m-fan"];
    let mut samples = Vec::new();
    let mut t = from;
    while t < to {
        for (i, meter) in meters.iter().enumerate() {
            let time_ms = t + i as i64 * 10;
            let sample = match plant(meter, time_ms) {
                Reading::Kw(p) => Sample {
                    meter: meter.to_string(),
                    time_ms,
                    quality: Quality::Ok,
                    values: Values {
                        power_kw: Some(p),
                        ..Values::default()
                    },
                },
                Reading::Timeout => Sample {
                    meter: meter.to_string(),
                    time_ms,
                    quality: Quality::Timeout,
                    values: Values::default(),
                },
            };
            samples.push(sample);
        }
        t += POLL_MS;
    }
    samples
}

/// Normal draw, with a little noise so no value stays frozen (R7).
fn normal_at(meter: &str, t: i64) -> Reading {
    let noise = ((t / POLL_MS) % 5) as f32 * 0.01;
    Reading::Kw(
        noise
            + match meter {
                "m-stenter" => 110.0,
                "m-pump" => 5.0,
                "m-condenser" => 6.4,
                "m-esp" => 4.0,
                _ => 17.6,
            },
    )
}

/// The seed incident: condenser, ESP and fan off from 14:03 to 14:30.
fn incident(meter: &str, t: i64) -> Reading {
    let down = ["m-condenser", "m-esp", "m-fan"].contains(&meter);
    if down && t >= hm(14, 3) && t < hm(14, 30) {
        Reading::Kw(0.0)
    } else {
        normal_at(meter, t)
    }
}

/// Closed R1 events (the gap tests also raise R5 for the silent meter).
fn closed(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.status == EventStatus::Closed && e.rule == Rule::R1)
        .collect()
}

fn run_all(samples: &[Sample]) -> Vec<Event> {
    let mut detector = GatewayDetector::new(site(), "gw");
    detector.apply(samples, 0)
}

#[test]
fn seed_incident_gives_one_closed_event_of_27_minutes_with_the_three_facilities() {
    let events = run_all(&history(hm(12, 0), hm(16, 0), incident));
    let closed = closed(&events);
    assert_eq!(closed.len(), 1, "{events:#?}");
    let event = closed[0];
    // First sample showing the condenser stopped: the 14:03:00 poll.
    assert_eq!(event.start_ms, hm(14, 3) + 20);
    // The condition stops holding with the first reading of the last
    // critical facility to run again (the fan, polled last).
    assert_eq!(event.end_ms, Some(hm(14, 30) + 40));
    assert_eq!(event.duration_secs(), Some(27 * 60));
    assert_eq!(event.facilities, ["condenser", "esp", "fan"]);
    assert_eq!(
        event.id,
        event_id("plant", "line1", Rule::R1, hm(14, 3) + 20)
    );
    assert_eq!(
        event.notice_en,
        "Demo Dyeing, Stenter line 1: treatment equipment stopped while production ran. \
         The alarm started at 2022-12-13 14:03 and lasted 27 minutes, involving condensers, \
         fans, high-voltage electrostatic. Please check and restore in time."
    );
    assert_eq!(
        event.notice_zh,
        "Demo Dyeing，Stenter line 1：生产设施运行期间治污设施停运。报警开始于2022-12-13 14:03，\
         持续27分钟，涉及冷凝器、风机、高压静电，请及时检查恢复。"
    );
    let json = event.to_json(chrono_tz::Asia::Shanghai);
    assert_eq!(json["start"], "2022-12-13T14:03:00.020+08:00");
    assert_eq!(json["duration_secs"], 1620);
    assert_eq!(json["status"], "closed");
}

#[test]
fn event_opens_after_the_minimum_duration_with_its_original_start() {
    let samples = history(hm(12, 0), hm(14, 20), incident);
    let events = run_all(&samples);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].status, EventStatus::Open);
    assert_eq!(events[0].start_ms, hm(14, 3) + 20);
    assert_eq!(events[0].end_ms, None);
}

/// The fan alone stops for `stopped_polls` polls from 14:00.
fn fan_stops_for(stopped_polls: i64) -> impl Fn(&str, i64) -> Reading {
    move |meter, t| {
        let stop = hm(14, 0);
        if meter == "m-fan" && t >= stop && t < stop + stopped_polls * POLL_MS {
            Reading::Kw(0.0)
        } else {
            normal_at(meter, t)
        }
    }
}

#[test]
fn condition_one_sample_short_of_the_minimum_gives_no_event() {
    // 19 stopped polls: stopped from 14:00:00 until the running reading
    // at 14:09:30, 570 s < 600 s.
    let events = run_all(&history(hm(13, 0), hm(15, 0), fan_stops_for(19)));
    assert_eq!(events, vec![]);
}

#[test]
fn condition_lasting_exactly_the_minimum_gives_one_event() {
    let events = run_all(&history(hm(13, 0), hm(15, 0), fan_stops_for(20)));
    let closed = closed(&events);
    assert_eq!(closed.len(), 1, "{events:#?}");
    assert_eq!(closed[0].duration_secs(), Some(600));
    assert_eq!(closed[0].facilities, ["fan"]);
}

#[test]
fn silent_meter_is_unknown_never_stopped() {
    let plant = |meter: &str, t: i64| {
        if meter == "m-fan" && t >= hm(14, 0) && t < hm(15, 0) {
            Reading::Timeout
        } else {
            normal_at(meter, t)
        }
    };
    let events = run_all(&history(hm(13, 0), hm(16, 0), plant));
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.rule, e.status, e.start_ms, e.end_ms, e.facilities.clone()))
        .collect();
    // Only R5 for the silent meter: from its last reading (13:59:30) to
    // its next one (15:00).
    assert_eq!(
        summary,
        vec![(
            Rule::R5,
            EventStatus::Closed,
            hm(13, 59) + 30_040,
            Some(hm(15, 0) + 40),
            vec!["fan".to_string()]
        )]
    );
    assert_eq!(
        events[0].id,
        event_id("plant", "line1/fan", Rule::R5, hm(13, 59) + 30_040)
    );
}

#[test]
fn non_critical_facility_alone_raises_nothing_but_is_listed_with_a_critical_one() {
    let pump_only = |meter: &str, t: i64| match meter {
        "m-pump" if t >= hm(14, 0) => Reading::Kw(0.0),
        _ => normal_at(meter, t),
    };
    assert_eq!(run_all(&history(hm(13, 0), hm(16, 0), pump_only)), vec![]);

    let pump_and_fan = |meter: &str, t: i64| match meter {
        "m-pump" | "m-fan" if t >= hm(14, 0) && t < hm(14, 30) => Reading::Kw(0.0),
        _ => normal_at(meter, t),
    };
    let events = run_all(&history(hm(13, 0), hm(16, 0), pump_and_fan));
    assert_eq!(closed(&events)[0].facilities, ["fan", "pump"]);
}

#[test]
fn treatment_stopped_while_production_is_stopped_is_no_violation() {
    let night = |meter: &str, _t: i64| match meter {
        "m-stenter" => Reading::Kw(8.0 + ((_t / POLL_MS) % 3) as f32 * 0.1),
        _ => Reading::Kw(0.0),
    };
    assert_eq!(run_all(&history(hm(0, 0), hm(6, 0), night)), vec![]);
}

#[test]
fn any_batching_and_restart_from_snapshots_yields_the_same_events() {
    let samples = history(hm(12, 0), hm(16, 0), incident);
    let reference = run_all(&samples);
    // Split into uneven batches and restart from a snapshot after each.
    let mut snapshot = GatewayDetector::new(site(), "gw").snapshot();
    let mut events: Vec<Event> = Vec::new();
    let mut rest = &samples[..];
    let mut size = 1;
    while !rest.is_empty() {
        let (batch, tail) = rest.split_at(size.min(rest.len()));
        let mut detector = GatewayDetector::restore(site(), "gw", &snapshot).unwrap();
        for event in detector.apply(batch, 0) {
            match events.iter_mut().find(|e| e.id == event.id) {
                Some(existing) => *existing = event,
                None => events.push(event),
            }
        }
        snapshot = detector.snapshot();
        rest = tail;
        size = size * 3 % 97 + 1;
    }
    assert_eq!(events, reference);
}

#[test]
fn event_store_encoding_round_trips_and_refuses_other_versions() {
    let events = run_all(&history(hm(12, 0), hm(16, 0), incident));
    let bytes = events[0].encode();
    assert_eq!(Event::decode(&bytes).unwrap(), events[0]);
    let mut newer = bytes.clone();
    newer[0] = 9;
    assert!(Event::decode(&newer)
        .unwrap_err()
        .to_string()
        .contains("version 9"));
    assert!(GatewayDetector::restore(site(), "gw", &[]).is_err());
}

#[test]
fn historical_flag_marks_intervals_closed_long_after_they_ended() {
    let samples = history(hm(12, 0), hm(16, 0), incident);
    let mut live = GatewayDetector::new(site(), "gw");
    let events = live.apply(&samples, hm(14, 33));
    assert!(!closed(&events)[0].historical);
    let mut replay = GatewayDetector::new(site(), "gw");
    let events = replay.apply(&samples, hm(20, 0));
    assert!(closed(&events)[0].historical);
}

/// The seed incident with the stenter's meter silent from `from` to
/// `until`.
fn incident_with_stenter_gap(from: i64, until: i64) -> impl Fn(&str, i64) -> Reading {
    move |meter, t| {
        if meter == "m-stenter" && t >= from && t < until {
            Reading::Timeout
        } else {
            incident(meter, t)
        }
    }
}

#[test]
fn a_short_gap_inside_an_interval_neither_ends_nor_splits_it() {
    // Silent for 3 minutes: unknown for 90 s, less than the clear duration.
    let plant = incident_with_stenter_gap(hm(14, 10), hm(14, 13));
    let events = run_all(&history(hm(12, 0), hm(16, 0), plant));

    let closed = closed(&events);
    assert_eq!(closed.len(), 1, "{events:#?}");
    assert_eq!(closed[0].start_ms, hm(14, 3) + 20);
    assert_eq!(closed[0].end_ms, Some(hm(14, 30) + 40));
}

#[test]
fn a_long_gap_before_confirmation_drops_what_the_data_cannot_show() {
    // Silent from 14:08 to 14:15: the first 5 minutes were never
    // confirmed; the interval that the data shows starts after the gap.
    let plant = incident_with_stenter_gap(hm(14, 8), hm(14, 15));
    let events = run_all(&history(hm(12, 0), hm(16, 0), plant));
    let closed = closed(&events);
    assert_eq!(closed.len(), 1, "{events:#?}");
    assert_eq!(closed[0].start_ms, hm(14, 15));
    assert_eq!(closed[0].end_ms, Some(hm(14, 30) + 40));
}

#[test]
fn a_long_gap_in_an_open_interval_ends_it_when_it_was_last_known() {
    // Open at 14:13; silent from 14:20 to 14:40, past the incident's end.
    let plant = incident_with_stenter_gap(hm(14, 20), hm(14, 40));
    let events = run_all(&history(hm(12, 0), hm(16, 0), plant));
    let closed = closed(&events);
    assert_eq!(closed.len(), 1, "{events:#?}");
    assert_eq!(closed[0].start_ms, hm(14, 3) + 20);
    // The last stenter reading was at 14:19:30; it is unknown from the end
    // of the stale span (3 polls) on.
    assert_eq!(closed[0].end_ms, Some(hm(14, 19) + 30_000 + 90_000));
}

/// Version 3's line state (R1 only), built from a current one.
#[derive(Serialize)]
struct LineV3<'a> {
    line: &'a str,
    clock_ms: Option<i64>,
    facilities: &'a [(String, FacilityState)],
    r1_holds: bool,
    r1_unknown_since: Option<i64>,
    r1: &'a Phase,
}

fn as_v3(lines: &[LineState]) -> Vec<LineV3<'_>> {
    lines
        .iter()
        .map(|l| LineV3 {
            line: &l.line,
            clock_ms: l.clock_ms,
            facilities: &l.facilities,
            r1_holds: l.r1.holds,
            r1_unknown_since: l.r1.unknown_since,
            r1: &l.r1.phase,
        })
        .collect()
}

/// (rule, status, start, end, facilities): what survives an old snapshot
/// (evidence gathered before the restart is not in it).
type Outline = (Rule, EventStatus, i64, Option<i64>, Vec<String>);

fn outline(events: &[Event]) -> Vec<Outline> {
    events
        .iter()
        .map(|e| (e.rule, e.status, e.start_ms, e.end_ms, e.facilities.clone()))
        .collect()
}

#[test]
fn snapshots_of_versions_2_and_3_restore_and_continue_r1() {
    let samples = history(hm(12, 0), hm(16, 0), incident);
    let (before, after) = samples.split_at(samples.len() / 2);
    let mut detector = GatewayDetector::new(site(), "gw");
    detector.apply(before, 0);
    let version_2 = encode_versioned(SNAPSHOT_VERSION_2, &as_v3(&detector.lines));
    let version_3 = encode_versioned(
        SNAPSHOT_VERSION_3,
        &(detector.newest_sample_ms, as_v3(&detector.lines)),
    );
    let expected = outline(&detector.clone().apply(after, 0));
    for old in [version_2, version_3] {
        let mut restored = GatewayDetector::restore(site(), "gw", &old).unwrap();
        assert_eq!(restored.newest_sample_ms(), detector.newest_sample_ms());
        assert_eq!(outline(&restored.apply(after, 0)), expected);
    }
}

#[test]
fn events_stored_as_version_1_still_decode() {
    /// Version 1's field order; its `Rule` was an enum (R1 = index 0).
    #[derive(Serialize)]
    struct Version1<'a> {
        id: &'a str,
        site: &'a str,
        gateway: &'a str,
        line: &'a str,
        rule_index: u32,
        status: EventStatus,
        start_ms: i64,
        end_ms: Option<i64>,
        facilities: &'a [String],
        historical: bool,
        notice_en: &'a str,
        notice_zh: &'a str,
    }
    let event = closed(&run_all(&history(hm(12, 0), hm(16, 0), incident)))[0].clone();
    let old = encode_versioned(
        EVENT_VERSION_1,
        &Version1 {
            id: &event.id,
            site: &event.site,
            gateway: &event.gateway,
            line: &event.line,
            rule_index: 0,
            status: event.status,
            start_ms: event.start_ms,
            end_ms: event.end_ms,
            facilities: &event.facilities,
            historical: event.historical,
            notice_en: &event.notice_en,
            notice_zh: &event.notice_zh,
        },
    );
    let without_evidence = Event {
        evidence: BTreeMap::new(),
        ..event.clone()
    };
    assert_eq!(Event::decode(&old).unwrap(), without_evidence);
    assert_ne!(old, event.encode());
}

#[test]
fn rules_are_stored_by_their_number() {
    assert_eq!(postcard::to_allocvec(&Rule::R1).unwrap(), vec![1]);
    assert_eq!(postcard::to_allocvec(&Rule::R5).unwrap(), vec![5]);
    assert_eq!(postcard::from_bytes::<Rule>(&[5]).unwrap(), Rule::R5);
    assert_eq!(postcard::from_bytes::<Rule>(&[7]).unwrap(), Rule::R7);
    assert!(postcard::from_bytes::<Rule>(&[8]).is_err());
}

#[test]
fn data_loss_before_any_sample_spans_nothing_and_starts_at_the_batch() {
    let mut detector = GatewayDetector::new(site(), "gw");
    let samples = history(hm(12, 0), hm(12, 5), normal_at);
    let loss = DataLoss {
        samples_dropped: 1,
        batches_missing: 0,
    };
    let events = detector.apply_batch(&samples, loss, hm(12, 6));
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!((event.start_ms, event.end_ms), (hm(12, 0), Some(hm(12, 0))));
    assert_eq!(event.data_loss, Some(loss));
    assert!(
        event
            .notice_en
            .contains("discarded 1 reading (buffer full) between"),
        "{}",
        event.notice_en
    );
    assert!(!event.notice_en.contains("missing"), "{}", event.notice_en);
    // Without any sample at all, the event is anchored at 0.
    let empty = GatewayDetector::new(site(), "gw").data_interruption(loss, None, 0);
    assert_eq!((empty.start_ms, empty.end_ms), (0, Some(0)));
}

/// The stenter runs from 08:00; the fan starts `late_polls` polls later
/// (the other treatment runs all along).
fn fan_starts_late(late_polls: i64) -> impl Fn(&str, i64) -> Reading {
    move |meter, t| match meter {
        "m-stenter" if t < hm(8, 0) => Reading::Kw(5.0 + ((t / POLL_MS) % 3) as f32 * 0.1),
        "m-fan" if t < hm(8, 0) + late_polls * POLL_MS => Reading::Kw(0.0),
        _ => normal_at(meter, t),
    }
}

#[test]
fn treatment_started_late_is_r2_from_production_start_to_treatment_start() {
    // 14 polls = 7 minutes late: more than 5, less than R1's 10.
    let events = run_all(&history(hm(7, 0), hm(9, 0), fan_starts_late(14)));
    assert_eq!(
        outline(&events),
        vec![(
            Rule::R2,
            EventStatus::Closed,
            hm(8, 0),
            Some(hm(8, 7) + 40),
            vec!["fan".to_string()]
        )]
    );
    assert_eq!(events[0].id, event_id("plant", "line1", Rule::R2, hm(8, 0)));
    assert!(
        events[0].notice_en.contains("started late"),
        "{}",
        events[0].notice_en
    );
    assert!(events[0].evidence.contains_key("stenter"));
    // 4.5 minutes late: nothing.
    assert_eq!(
        run_all(&history(hm(7, 0), hm(9, 0), fan_starts_late(9))),
        vec![]
    );
    // 12 minutes late: R1 owns it, no R2.
    let rules: Vec<Rule> = run_all(&history(hm(7, 0), hm(9, 0), fan_starts_late(24)))
        .iter()
        .map(|e| e.rule)
        .collect();
    assert_eq!(rules, vec![Rule::R1]);
}

/// The fan stops at 17:00; the stenter stops `after_polls` polls later.
fn production_stops_after(after_polls: i64) -> impl Fn(&str, i64) -> Reading {
    move |meter, t| match meter {
        "m-fan" if t >= hm(17, 0) => Reading::Kw(0.0),
        "m-stenter" if t >= hm(17, 0) + after_polls * POLL_MS => {
            Reading::Kw(5.0 + ((t / POLL_MS) % 3) as f32 * 0.1)
        }
        _ => normal_at(meter, t),
    }
}

#[test]
fn production_running_on_after_treatment_stopped_is_r3_short_of_r1() {
    let events = run_all(&history(hm(16, 0), hm(18, 0), production_stops_after(16)));
    assert_eq!(
        outline(&events),
        vec![(
            Rule::R3,
            EventStatus::Closed,
            hm(17, 0) + 40,
            Some(hm(17, 8)),
            vec!["fan".to_string()]
        )]
    );
    // Production stops 3 minutes after treatment: a normal shutdown.
    assert_eq!(
        run_all(&history(hm(16, 0), hm(18, 0), production_stops_after(6))),
        vec![]
    );
}

#[test]
fn a_facility_in_maintenance_raises_nothing() {
    let text = format!(
        "{SITE}\n[[maintenance]]\nfacilities = [\"fan\"]\nfrom = \"2022-12-13T13:30:00+08:00\"\nuntil = \"2022-12-13T15:00:00+08:00\"\nreason = \"bearing\"\n"
    );
    let site = Arc::new(Site::from_toml(&text, "test.site.toml").unwrap());
    assert_eq!(site.maintenance[0].reason, "bearing");
    let mut detector = GatewayDetector::new(site, "gw");
    let events = detector.apply(&history(hm(13, 0), hm(16, 0), fan_stops_for(40)), 0);
    assert_eq!(events, vec![]);
}

#[test]
fn frozen_power_for_an_hour_is_r7_and_a_counter_going_back_is_a_point_event() {
    let plant = |meter: &str, t: i64| match meter {
        "m-esp" if t >= hm(10, 0) && t < hm(11, 30) => Reading::Kw(4.0),
        _ => normal_at(meter, t),
    };
    let events = run_all(&history(hm(9, 0), hm(12, 0), plant));
    assert_eq!(
        outline(&events),
        vec![(
            Rule::R7,
            EventStatus::Closed,
            hm(10, 0) + 30,
            // 11:30:00 reads 4.0 again (no noise that poll).
            Some(hm(11, 30) + 30_030),
            vec!["esp".to_string()]
        )]
    );
    let mut samples = history(hm(9, 0), hm(9, 2), normal_at);
    for (i, s) in samples.iter_mut().enumerate() {
        s.values.energy_kwh = Some(if i == 7 { 1.0 } else { 100.0 + i as f64 });
    }
    let events = run_all(&samples);
    assert_eq!(
        outline(&events),
        vec![(
            Rule::R7,
            EventStatus::Closed,
            samples[7].time_ms,
            Some(samples[7].time_ms),
            vec![samples[7].meter.trim_start_matches("m-").to_string()]
        )]
    );
}

#[test]
fn power_in_json_is_the_f32_as_the_meter_gave_it() {
    use serde_json::json;
    assert_eq!(kw_json(9.7), json!(9.7));
    assert_eq!(kw_json(110.0), json!(110.0));
    assert_eq!(kw_json(f32::NAN), serde_json::Value::Null);
}

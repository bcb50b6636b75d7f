//! Polling over shared buses against fake peers: eight meters on one RTU
//! bus with one that falls silent, and late replies on TCP and RTU over
//! TCP. Real time with short poll intervals; the fakes record when each
//! request arrived.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{image, words, FakeServer, Framing, Reply, Request};
use facwatch_gateway::poll::{self, PollSettings};
use facwatch_gateway::Stats;
use facwatch_proto::clock::Clock;
use facwatch_proto::profile::{Profile, ProfileName, Ratios, ReadLimits};
use facwatch_proto::site::{Meter, Transport};
use facwatch_proto::wire::{Quality, Sample, Values};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn meter_values(unit: u8) -> Values {
    Values {
        power_kw: Some(f32::from(unit) * 1.5),
        energy_kwh: Some(1000.0 + f64::from(unit)),
        voltage_v: vec![230.0 + f32::from(unit)],
        current_a: vec![f32::from(unit) * 0.5],
        power_factor: Some(0.5),
    }
}

fn meter(id: String, transport: Transport, unit: u8, timeout: Duration, retries: u32) -> Meter {
    Meter {
        id,
        gateway: "gw".into(),
        profile: Profile::builtin(ProfileName::Sdm120),
        transport,
        unit,
        ratios: Ratios::default(),
        read_limits: ReadLimits::default(),
        timeout,
        retries,
    }
}

fn poll_settings(interval: Duration, meters: Vec<Meter>) -> PollSettings {
    PollSettings {
        site: "test-site".into(),
        gateway: "gw".into(),
        poll_interval: interval,
        clock: Clock::real(),
        until_ms: None,
        meters,
        meter_lines: Default::default(),
    }
}

/// Runs polling until `done` says so about the samples so far; returns
/// them in order.
async fn poll_until(
    settings: PollSettings,
    on_sample: impl FnMut(&Sample),
    done: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let (tx, mut rx) = mpsc::channel(64);
    let stop = CancellationToken::new();
    let polling = tokio::spawn(poll::run(
        settings,
        tx,
        Arc::new(Stats::default()),
        stop.clone(),
    ));
    let mut on_sample = on_sample;
    let mut samples = Vec::new();
    while let Some(sample) = rx.recv().await {
        on_sample(&sample);
        samples.push(sample);
        if done(&samples) {
            break;
        }
    }
    stop.cancel();
    polling.await.unwrap().unwrap();
    samples
}

const SILENT_UNIT: u8 = 8;
/// Slots the silent unit stays silent, counted from its first silent slot.
const SILENT_SLOTS: usize = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_silent_meter_on_an_rtu_bus_costs_the_other_seven_nothing() {
    tokio::time::timeout(Duration::from_secs(40), eight_meters_one_silent())
        .await
        .expect("the test finished within 40 s");
}

async fn eight_meters_one_silent() {
    // A first failure (two timeouts, and before the retry the time the
    // missing reply takes on the wire) takes about 125 ms of bus time, well
    // within the quarter of the bus it may take over two slots (600 ms):
    // the slot backoff rules here, not the bus share.
    let interval = Duration::from_millis(300);
    let timeout = Duration::from_millis(50);
    let images: HashMap<u8, _> = (1..=8)
        .map(|unit| {
            (
                unit,
                image(ProfileName::Sdm120, &meter_values(unit), Ratios::default()),
            )
        })
        .collect();
    let silent = Arc::new(AtomicBool::new(false));
    let responder = {
        let silent = Arc::clone(&silent);
        Arc::new(move |request: &Request| {
            if request.unit == SILENT_UNIT && silent.load(Ordering::SeqCst) {
                return Reply::Silent;
            }
            match images.get(&request.unit) {
                Some(image) => Reply::Words(words(image, request)),
                None => Reply::Silent,
            }
        })
    };
    let bus = FakeServer::start(Framing::RtuOverTcp, responder).await;
    let transport = Transport::RtuOverTcp {
        address: bus.address,
        baud: 38_400,
    };
    let silence = transport.inter_frame_silence();
    let meters = (1..=8)
        .map(|unit| meter(format!("m{unit}"), transport.clone(), unit, timeout, 1))
        .collect();

    // Unit 8 falls silent after its third good reading and answers again
    // after SILENT_SLOTS of its samples; the flag flips as its sample
    // arrives, so between two of its polls. Slots are numbered by the real
    // clock (aligned to the interval); every sample is taken early in its
    // slot.
    let interval_ms = interval.as_millis() as i64;
    let slot_of = move |time_ms: i64| time_ms.div_euclid(interval_ms);
    let mut first_silent_slot = None;
    let mut first_answering_slot = None;
    let mut unit8_samples = 0;
    let samples = poll_until(
        poll_settings(interval, meters),
        |sample| {
            if sample.meter != format!("m{SILENT_UNIT}") {
                return;
            }
            unit8_samples += 1;
            if unit8_samples == 3 {
                silent.store(true, Ordering::SeqCst);
                first_silent_slot = Some(slot_of(sample.time_ms) + 1);
            }
            if unit8_samples == 3 + SILENT_SLOTS {
                silent.store(false, Ordering::SeqCst);
                first_answering_slot = Some(slot_of(sample.time_ms) + 1);
            }
        },
        |samples| {
            // Done when unit 8 has read well three times after it returned.
            samples
                .iter()
                .filter(|s| s.meter == "m8" && s.quality == Quality::Ok)
                .count()
                >= 6
        },
    )
    .await;
    let first_silent_slot = first_silent_slot.unwrap();
    let first_answering_slot = first_answering_slot.unwrap();
    assert_eq!(
        first_answering_slot - first_silent_slot,
        SILENT_SLOTS as i64,
        "the bus skipped a slot: the machine stalled for more than {interval:?}"
    );
    let log = bus.log();

    // The other seven: every sample good, and every interval between the
    // first requests of their polls within 20 % of nominal.
    let nominal = interval.as_secs_f64() * 1000.0;
    let mut worst_deviation: f64 = 0.0;
    let mut intervals_measured = 0;
    for unit in 1..=7u8 {
        let id = format!("m{unit}");
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.meter == id).collect();
        assert!(mine.len() >= 20, "{id}: {} samples", mine.len());
        for sample in &mine {
            assert_eq!(sample.quality, Quality::Ok, "{sample:?}");
            assert_eq!(sample.values, decoded(&meter_values(unit)), "{sample:?}");
        }
        let starts: Vec<_> = log
            .iter()
            .filter(|l| l.request.unit == unit && l.request.address == 0)
            .map(|l| l.request.at)
            .collect();
        for pair in starts.windows(2) {
            let ms = (pair[1] - pair[0]).as_secs_f64() * 1000.0;
            worst_deviation = worst_deviation.max((ms - nominal).abs() / nominal);
            intervals_measured += 1;
            assert!(
                (0.8 * nominal..=1.2 * nominal).contains(&ms),
                "unit {unit}: interval of {ms:.1} ms"
            );
        }
    }

    // Unit 8: one sample per slot throughout; while silent, asked at slots
    // 0, 2, 5 and 10 of its silence (the first time with one retry), every
    // other slot skipped as Offline; read again at slot 19, the first
    // after its last backoff of 8 slots.
    let unit8: Vec<&Sample> = samples.iter().filter(|s| s.meter == "m8").collect();
    let relative = |sample: &Sample| slot_of(sample.time_ms) - first_silent_slot;
    let in_silence: Vec<(i64, Quality)> = unit8
        .iter()
        .filter(|s| (0..SILENT_SLOTS as i64).contains(&relative(s)))
        .map(|s| (relative(s), s.quality))
        .collect();
    let expected: Vec<(i64, Quality)> = (0..SILENT_SLOTS as i64)
        .map(|slot| {
            let quality = if [0, 2, 5, 10].contains(&slot) {
                Quality::Timeout
            } else {
                Quality::Offline
            };
            (slot, quality)
        })
        .collect();
    assert_eq!(in_silence, expected);
    // Unit 8 leaves a request unanswered only while silent.
    let requests_while_silent: Vec<&Request> = log
        .iter()
        .filter(|l| l.request.unit == SILENT_UNIT && l.answered_at.is_none())
        .map(|l| &l.request)
        .collect();
    assert_eq!(
        requests_while_silent.len(),
        5,
        "two at the first failure (one retry), then one per backoff period"
    );
    let after: Vec<(i64, Quality)> = unit8
        .iter()
        .filter(|s| relative(s) >= SILENT_SLOTS as i64)
        .map(|s| (relative(s), s.quality))
        .take(5)
        .collect();
    assert_eq!(
        after,
        vec![
            (15, Quality::Offline),
            (16, Quality::Offline),
            (17, Quality::Offline),
            (18, Quality::Offline),
            (19, Quality::Ok),
        ]
    );
    let returned = unit8
        .iter()
        .find(|s| relative(s) >= SILENT_SLOTS as i64 && s.quality == Quality::Ok)
        .unwrap();
    assert_eq!(returned.values, decoded(&meter_values(8)));
    // Every unit has a sample in every slot the bus reached.
    let per_meter: Vec<usize> = (1..=8)
        .map(|u| {
            samples
                .iter()
                .filter(|s| s.meter == format!("m{u}"))
                .count()
        })
        .collect();
    assert!(
        per_meter.iter().all(|n| n.abs_diff(per_meter[7]) <= 1),
        "{per_meter:?}"
    );

    // The inter-frame silence after every answer, before the next request.
    let mut smallest_gap = Duration::MAX;
    for pair in log.windows(2) {
        if let Some(answered) = pair[0].answered_at {
            let gap = pair[1].request.at - answered;
            smallest_gap = smallest_gap.min(gap);
        }
    }
    assert!(
        smallest_gap >= silence,
        "a request came {smallest_gap:?} after an answer; the silence is {silence:?}"
    );
    println!(
        "8 meters, {} ms interval: {intervals_measured} intervals of units 1-7, worst deviation {:.1} %; \
         unit 8 asked {} times in {SILENT_SLOTS} silent slots; smallest gap after an answer {:?} (silence {:?})",
        interval.as_millis(),
        worst_deviation * 100.0,
        requests_while_silent.len(),
        smallest_gap,
        silence,
    );
}

/// What the gateway decodes from a meter showing `values` (SDM120).
fn decoded(values: &Values) -> Values {
    let profile = Profile::builtin(ProfileName::Sdm120);
    let image = image(ProfileName::Sdm120, values, Ratios::default());
    let results: Vec<_> = profile
        .reads(ReadLimits::default())
        .into_iter()
        .map(|read| facwatch_proto::profile::ReadResult {
            function: read.function,
            address: read.address,
            words: (0..read.count)
                .map(|i| {
                    image
                        .get(&(read.function.code(), read.address + i))
                        .copied()
                        .unwrap_or(0)
                })
                .collect(),
        })
        .collect();
    profile.decode(&results, Ratios::default()).unwrap()
}

// ---- Late replies ----

/// Request number n shows n kW; every request with n % 3 == 2 is answered
/// only after twice the timeout.
fn numbered_replies(timeout: Duration) -> common::Responder {
    Arc::new(move |request: &Request| {
        let values = Values {
            power_kw: Some(request.number as f32),
            ..meter_values(1)
        };
        let words = words(
            &image(ProfileName::Sdm630, &values, Ratios::default()),
            request,
        );
        if request.number % 3 == 2 {
            Reply::Late {
                words,
                after: timeout * 2,
            }
        } else {
            Reply::Words(words)
        }
    })
}

fn is_late(number: u64) -> bool {
    number % 3 == 2
}

/// Polls one SDM630 (one request per poll) behind a fake answering every
/// third request late, until `polls` requests were made; returns the
/// samples and the fake.
async fn late_replies(framing: Framing, retries: u32, polls: usize) -> (Vec<Sample>, FakeServer) {
    let timeout = Duration::from_millis(50);
    let server = FakeServer::start(framing, numbered_replies(timeout)).await;
    let address: SocketAddr = server.address;
    let transport = match framing {
        Framing::Tcp => Transport::Tcp(address),
        Framing::RtuOverTcp => Transport::RtuOverTcp {
            address,
            baud: 115_200,
        },
    };
    let meter = Meter {
        profile: Profile::builtin(ProfileName::Sdm630),
        read_limits: ReadLimits {
            max_registers: 125,
            max_gap: 125,
        },
        ..meter("m".into(), transport, 1, timeout, retries)
    };
    assert_eq!(meter.profile.reads(meter.read_limits).len(), 1);
    let watched = server.clone();
    let samples = poll_until(
        poll_settings(Duration::from_millis(150), vec![meter]),
        |_| {},
        move |samples| {
            samples.len() >= polls
                && watched
                    .log()
                    .iter()
                    .all(|l| !is_late(l.request.number) || l.answered_at.is_some())
        },
    )
    .await;
    (samples, server)
}

async fn no_sample_carries_another_requests_values_without_retries(framing: Framing) {
    let (samples, server) = late_replies(framing, 0, 15).await;
    // Without retries a poll is one request; skipped slots (Offline) make
    // none. So the n-th sample that made a request belongs to request n.
    let asked: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.quality != Quality::Offline)
        .collect();
    let requests = server.log();
    assert!(asked.len() >= 8, "{samples:?}");
    for (sample, logged) in asked.iter().zip(&requests) {
        let n = logged.request.number;
        if is_late(n) {
            assert_eq!(sample.quality, Quality::Timeout, "request {n}: {sample:?}");
        } else {
            assert_eq!(sample.quality, Quality::Ok, "request {n}: {sample:?}");
            assert_eq!(sample.values.power_kw, Some(n as f32), "request {n}");
        }
    }
    // A late request is followed by one skipped slot (backoff).
    for pair in samples.windows(2) {
        if pair[0].quality == Quality::Timeout {
            assert_eq!(pair[1].quality, Quality::Offline, "{samples:?}");
        }
    }
    // Every timeout dropped the connection: each request after a late one
    // came on a new connection, and no other request did.
    let last = requests.last().unwrap().request.number;
    let late_then_more = (1..last).filter(|n| is_late(*n)).count() as u64;
    assert_eq!(server.connections(), 1 + late_then_more);
}

async fn a_retry_is_answered_with_its_own_values(framing: Framing) {
    let (samples, server) = late_replies(framing, 1, 10).await;
    // Each late request is retried at once in the same poll and the retry
    // is on time: every sample is good and carries the retry's number.
    let on_time: Vec<f32> = server
        .log()
        .iter()
        .map(|l| l.request.number)
        .filter(|n| !is_late(*n))
        .map(|n| n as f32)
        .collect();
    let got: Vec<f32> = samples
        .iter()
        .map(|s| {
            assert_eq!(s.quality, Quality::Ok, "{s:?}");
            s.values.power_kw.unwrap()
        })
        .collect();
    assert!(got.len() >= 10);
    assert_eq!(got[..], on_time[..got.len()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_never_answers_another_request_over_tcp() {
    tokio::time::timeout(
        Duration::from_secs(30),
        no_sample_carries_another_requests_values_without_retries(Framing::Tcp),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_never_answers_another_request_over_rtu_over_tcp() {
    tokio::time::timeout(
        Duration::from_secs(30),
        no_sample_carries_another_requests_values_without_retries(Framing::RtuOverTcp),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_is_answered_with_its_own_values_over_tcp() {
    tokio::time::timeout(
        Duration::from_secs(30),
        a_retry_is_answered_with_its_own_values(Framing::Tcp),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_is_answered_with_its_own_values_over_rtu_over_tcp() {
    tokio::time::timeout(
        Duration::from_secs(30),
        a_retry_is_answered_with_its_own_values(Framing::RtuOverTcp),
    )
    .await
    .unwrap();
}

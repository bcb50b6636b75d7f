//! Modbus RTU on a serial port, for real: the gateway opens the slave side
//! of a pseudo-terminal pair by its path, as it would /dev/ttyUSB0, and a
//! fake SDM630 answers on the master side. Covers opening the port with
//! line settings, reading, and a reply that comes after the timeout, which
//! must never be read as the answer to the retry that follows it.

#![cfg(unix)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use facwatch_gateway::poll::{self, PollSettings};
use facwatch_gateway::Stats;
use facwatch_proto::clock::Clock;
use facwatch_proto::profile::{FunctionCode, Parity, Profile, ProfileName, Ratios, ReadLimits};
use facwatch_proto::rtu;
use facwatch_proto::site::{Meter, SerialLine, Transport};
use facwatch_proto::wire::{Quality, Sample, Values};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::{SerialPort as _, SerialStream};
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_millis(50);

fn values(power_kw: f32) -> Values {
    Values {
        power_kw: Some(power_kw),
        energy_kwh: Some(500.0),
        voltage_v: vec![230.0, 231.0, 232.0],
        current_a: vec![1.0, 2.0, 3.0],
        power_factor: Some(0.75),
    }
}

/// Request n shows n kW. An on-time answer comes after 20 ms; every
/// request with n % 3 == 2 is answered at 1.2 x the timeout: after the
/// gateway gave up, but before an immediate retry would have its answer.
fn is_late(n: u64) -> bool {
    n % 3 == 2
}

/// Answers RTU requests on the master side of the pair; returns the
/// request numbers as they arrived.
fn serve(mut master: SerialStream) -> Arc<Mutex<Vec<u64>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        let profile = Profile::builtin(ProfileName::Sdm630);
        let mut frame = [0u8; 8];
        let mut number = 0u64;
        while master.read_exact(&mut frame).await.is_ok() {
            let Ok(request) = rtu::parse_read_request(&frame) else {
                continue;
            };
            number += 1;
            seen.lock().unwrap().push(number);
            let image = profile.encode(&values(number as f32), Ratios::default());
            let words: Vec<u16> = (request.address..request.address + request.count)
                .map(|a| {
                    image
                        .iter()
                        .find(|(_, r, _)| *r == a)
                        .map_or(0, |(_, _, w)| *w)
                })
                .collect();
            let function = FunctionCode::from_code(request.function).unwrap();
            let reply = rtu::read_response(request.unit, function, &words);
            let delay = if is_late(number) {
                TIMEOUT.mul_f64(1.2)
            } else {
                Duration::from_millis(20)
            };
            tokio::time::sleep(delay).await;
            if master.write_all(&reply).await.is_err() {
                return;
            }
        }
    });
    log
}

fn serial_meter(path: String, retries: u32) -> Meter {
    Meter {
        id: "m".into(),
        gateway: "gw".into(),
        profile: Profile::builtin(ProfileName::Sdm630),
        transport: Transport::Serial(SerialLine {
            path,
            baud: 9600,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
        }),
        unit: 1,
        ratios: Ratios::default(),
        // One read per poll.
        read_limits: ReadLimits {
            max_registers: 125,
            max_gap: 125,
        },
        timeout: TIMEOUT,
        retries,
    }
}

/// Polls one SDM630 on a pseudo-terminal until `polls` samples are in.
async fn poll_serial(retries: u32, interval: Duration, polls: usize) -> (Vec<Sample>, Vec<u64>) {
    let (master, slave) = SerialStream::pair().unwrap();
    let path = slave.name().unwrap();
    // The test keeps its slave handle open so the master never sees the
    // line hang up between the gateway's opens.
    let requests = serve(master);
    let (tx, mut rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let polling = tokio::spawn(poll::run(
        PollSettings {
            site: "s".into(),
            gateway: "gw".into(),
            poll_interval: interval,
            clock: Clock::real(),
            until_ms: None,
            meters: vec![serial_meter(path, retries)],
            meter_lines: Default::default(),
        },
        tx,
        Arc::new(Stats::default()),
        stop.clone(),
    ));
    let mut samples = Vec::new();
    while samples.len() < polls {
        samples.push(rx.recv().await.unwrap());
    }
    stop.cancel();
    polling.await.unwrap().unwrap();
    drop(slave);
    let requests = requests.lock().unwrap().clone();
    (samples, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_on_a_serial_line_never_answers_the_retry() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (samples, requests) = poll_serial(1, Duration::from_millis(400), 8).await;
        // Each late request was retried in the same poll; the late reply
        // reached the port while the gateway waited before the retry, and
        // was discarded: every sample carries its retry's number.
        let on_time: Vec<f32> = requests
            .iter()
            .filter(|n| !is_late(**n))
            .map(|n| *n as f32)
            .collect();
        let got: Vec<f32> = samples
            .iter()
            .map(|s| {
                assert_eq!(s.quality, Quality::Ok, "{s:?}");
                s.values.power_kw.unwrap()
            })
            .collect();
        assert_eq!(got[..], on_time[..got.len()]);
        assert!(requests.iter().any(|n| is_late(*n)));
        let last = samples.last().unwrap();
        assert_eq!(last.values.voltage_v, vec![230.0, 231.0, 232.0]);
        assert_eq!(last.values.power_factor, Some(0.75));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_on_a_serial_line_never_answers_the_next_poll() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (samples, requests) = poll_serial(0, Duration::from_millis(150), 14).await;
        // Without retries each poll that asked made one request; slots
        // skipped while backing off made none.
        let asked: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.quality != Quality::Offline)
            .collect();
        assert!(asked.len() >= 8, "{samples:?}");
        for (sample, n) in asked.iter().zip(&requests) {
            if is_late(*n) {
                assert_eq!(sample.quality, Quality::Timeout, "request {n}");
            } else {
                assert_eq!(sample.quality, Quality::Ok, "request {n}");
                assert_eq!(sample.values.power_kw, Some(*n as f32), "request {n}");
            }
        }
    })
    .await
    .unwrap();
}

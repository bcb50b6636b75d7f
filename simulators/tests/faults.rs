//! Each meter fault of the scenario file, as a client on each transport
//! sees it: `meter_silent` a timeout, `modbus_exception` its code,
//! `slow_reply` a correct answer after the delay, `late_reply` an answer
//! that arrives after the client gave up, `bad_crc` a frame that fails its
//! CRC (RTU) or nothing (Modbus TCP).

mod common;

use std::time::{Duration, Instant};

use common::{bounded, poll, start, Pty, Running, TestMeter, RTU_OVER_TCP, TCP};
use facwatch_proto::profile::{FunctionCode, RegisterRead};
use facwatch_proto::rtu;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_modbus::client::Reader;
use tokio_modbus::prelude::ExceptionCode;

/// A client's timeout in these tests; the late meters' are shorter still.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(150);
const SLOW: Duration = Duration::from_millis(300);
const LATE: Duration = Duration::from_millis(600);

/// DTSU666's total active power, FC03.
const PT: RegisterRead = RegisterRead {
    function: FunctionCode::ReadHoldingRegisters,
    address: 0x2012,
    count: 2,
};

/// On a bus with `transport` (prefix `p`): a healthy meter (unit 1) and
/// one per fault, all DTSU666.
fn faulty_bus(p: &str, transport: &str) -> Vec<TestMeter> {
    let meter =
        |name: &str, unit| TestMeter::new(&format!("{p}-{name}"), "dtsu666", transport, unit);
    vec![
        meter("healthy", 1),
        meter("silent", 2),
        meter("exception", 3),
        meter("slow", 4).with("timeout_ms = 1000"),
        meter("late", 5).with("timeout_ms = 100"),
        meter("bad-crc", 6),
    ]
}

/// The faults of [`faulty_bus`] on the buses with `prefixes`.
fn faults(prefixes: &[&str]) -> String {
    let meters = |name: &str| {
        let ids: Vec<String> = prefixes.iter().map(|p| format!("\"{p}-{name}\"")).collect();
        format!("meters = [{}]", ids.join(", "))
    };
    [
        format!("kind = \"meter_silent\"\n{}", meters("silent")),
        format!(
            "kind = \"modbus_exception\"\n{}\ncode = 6",
            meters("exception")
        ),
        format!(
            "kind = \"slow_reply\"\n{}\ndelay_ms = {}",
            meters("slow"),
            SLOW.as_millis()
        ),
        format!(
            "kind = \"late_reply\"\n{}\ndelay_ms = {}",
            meters("late"),
            LATE.as_millis()
        ),
        format!("kind = \"bad_crc\"\n{}", meters("bad-crc")),
    ]
    .join("\n----\n")
}

/// A TCP bus and an RTU-over-TCP bus, each a [`faulty_bus`].
async fn start_faulty() -> Running {
    let mut meters = faulty_bus("tcp", TCP);
    meters.extend(faulty_bus("rot", RTU_OVER_TCP));
    start(&meters, &faults(&["tcp", "rot"])).await
}

#[tokio::test]
async fn silent_meter_times_out_and_its_bus_stays_usable() {
    bounded(async {
        let sim = start_faulty().await;
        for p in ["tcp", "rot"] {
            let mut ctx = sim.connect(&format!("{p}-silent")).await;
            let read =
                tokio::time::timeout(CLIENT_TIMEOUT, ctx.read_holding_registers(0x2012, 2)).await;
            assert!(read.is_err(), "{p}: the silent meter answered: {read:?}");
            let healthy = format!("{p}-healthy");
            let mut ctx = sim.connect(&healthy).await;
            let from = sim.clock.now_ms();
            let values = poll(&mut ctx, sim.meter(&healthy)).await;
            sim.assert_read_from_plant(&healthy, &values, from, sim.clock.now_ms());
        }
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn exception_fault_answers_its_code() {
    bounded(async {
        let sim = start_faulty().await;
        for p in ["tcp", "rot"] {
            let mut ctx = sim.connect(&format!("{p}-exception")).await;
            assert_eq!(
                ctx.read_holding_registers(0x2012, 2).await.unwrap(),
                Err(ExceptionCode::ServerDeviceBusy),
                "{p}"
            );
        }
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn slow_reply_answers_correctly_after_its_delay() {
    bounded(async {
        let sim = start_faulty().await;
        for p in ["tcp", "rot"] {
            let id = format!("{p}-slow");
            let mut ctx = sim.connect(&id).await;
            let meter = sim.meter(&id);
            let reads = meter.profile.reads(meter.read_limits).len() as u32;
            let asked = Instant::now();
            let from = sim.clock.now_ms();
            let values = poll(&mut ctx, meter).await;
            assert!(
                asked.elapsed() >= SLOW * reads,
                "{p}: {:?}",
                asked.elapsed()
            );
            sim.assert_read_from_plant(&id, &values, from, sim.clock.now_ms());
        }
        sim.stop().await;
    })
    .await;
}

/// Reads exactly `length` bytes, or `None` if the first does not come
/// within `within`.
async fn read_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    length: usize,
    within: Duration,
) -> Option<Vec<u8>> {
    let mut frame = vec![0; length];
    tokio::time::timeout(within, stream.read_exact(&mut frame[..1]))
        .await
        .ok()?
        .unwrap();
    stream.read_exact(&mut frame[1..]).await.unwrap();
    Some(frame)
}

/// A Modbus TCP request for [`PT`] with transaction id `id`.
fn mbap_request(id: u16, unit: u8) -> Vec<u8> {
    let mut frame = id.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, 0, 0, 6, unit, 3, 0x20, 0x12, 0, 2]);
    frame
}

#[tokio::test]
async fn late_reply_arrives_after_the_client_gave_up() {
    bounded(async {
        let sim = start_faulty().await;
        // A tokio-modbus client times out, as the gateway does.
        for p in ["tcp", "rot"] {
            let mut ctx = sim.connect(&format!("{p}-late")).await;
            let read =
                tokio::time::timeout(CLIENT_TIMEOUT, ctx.read_holding_registers(0x2012, 2)).await;
            assert!(
                read.is_err(),
                "{p}: the late meter answered in time: {read:?}"
            );
        }
        // On the wire, the answer still comes, on the same connection.
        let late = sim.meter("tcp-late");
        let mut stream = TcpStream::connect(sim.address("tcp-late")).await.unwrap();
        let asked = Instant::now();
        stream
            .write_all(&mbap_request(0x0A0B, late.unit))
            .await
            .unwrap();
        assert_eq!(read_within(&mut stream, 13, CLIENT_TIMEOUT).await, None);
        let reply = read_within(&mut stream, 13, LATE * 2)
            .await
            .expect("no late reply");
        assert!(asked.elapsed() >= LATE, "{:?}", asked.elapsed());
        // Its own transaction id, length 7, unit, FC03, 4 bytes.
        assert_eq!(reply[..9], [0x0A, 0x0B, 0, 0, 0, 7, late.unit, 3, 4]);

        let late = sim.meter("rot-late");
        let mut stream = TcpStream::connect(sim.address("rot-late")).await.unwrap();
        let asked = Instant::now();
        stream
            .write_all(&rtu::read_request(late.unit, PT))
            .await
            .unwrap();
        assert_eq!(read_within(&mut stream, 9, CLIENT_TIMEOUT).await, None);
        let reply = read_within(&mut stream, 9, LATE * 2)
            .await
            .expect("no late reply");
        assert!(asked.elapsed() >= LATE, "{:?}", asked.elapsed());
        assert_eq!(reply[..3], [late.unit, 3, 4]);
        assert!(rtu::crc_ok(&reply));
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_crc_fails_the_rtu_check_and_is_silence_on_modbus_tcp() {
    bounded(async {
        let sim = start_faulty().await;
        let bad = sim.meter("rot-bad-crc");
        let mut stream = TcpStream::connect(sim.address("rot-bad-crc"))
            .await
            .unwrap();
        stream
            .write_all(&rtu::read_request(bad.unit, PT))
            .await
            .unwrap();
        let reply = read_within(&mut stream, 9, CLIENT_TIMEOUT)
            .await
            .expect("no reply");
        assert_eq!(reply[..3], [bad.unit, 3, 4]);
        assert!(!rtu::crc_ok(&reply), "{reply:02X?}");

        // tokio-modbus's RTU client discards the frame: an error or, as it
        // waits for a frame that passes, a timeout; never registers.
        let mut ctx = sim.connect("rot-bad-crc").await;
        let read =
            tokio::time::timeout(CLIENT_TIMEOUT, ctx.read_holding_registers(0x2012, 2)).await;
        assert!(!matches!(read, Ok(Ok(Ok(_)))), "{read:?}");

        let mut ctx = sim.connect("tcp-bad-crc").await;
        let read =
            tokio::time::timeout(CLIENT_TIMEOUT, ctx.read_holding_registers(0x2012, 2)).await;
        assert!(
            read.is_err(),
            "a bad-CRC meter answered over Modbus TCP: {read:?}"
        );
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn on_a_serial_bus_a_late_meter_does_not_hold_up_the_others() {
    bounded(async {
        let mut pty = Pty::open();
        let sim = start(&faulty_bus("ser", &pty.transport()), &faults(&["ser"])).await;
        let bus = &mut pty.master;
        let unit = |id: &str| sim.meter(id).unit;
        let asked = Instant::now();
        write(bus, &rtu::read_request(unit("ser-late"), PT)).await;
        assert_eq!(read_within(bus, 9, CLIENT_TIMEOUT).await, None);
        // The gateway moves on to the next meter, which answers at once.
        write(bus, &rtu::read_request(unit("ser-healthy"), PT)).await;
        let healthy = read_within(bus, 9, CLIENT_TIMEOUT).await.expect("no reply");
        assert_eq!(healthy[..3], [unit("ser-healthy"), 3, 4]);
        assert!(rtu::crc_ok(&healthy));
        assert!(asked.elapsed() < LATE, "{:?}", asked.elapsed());
        // Then the late meter's answer crosses the bus.
        let late = read_within(bus, 9, LATE * 2).await.expect("no late reply");
        assert!(asked.elapsed() >= LATE, "{:?}", asked.elapsed());
        assert_eq!(late[..3], [unit("ser-late"), 3, 4]);

        write(bus, &rtu::read_request(unit("ser-bad-crc"), PT)).await;
        let bad = read_within(bus, 9, CLIENT_TIMEOUT).await.expect("no reply");
        assert_eq!(bad[..3], [unit("ser-bad-crc"), 3, 4]);
        assert!(!rtu::crc_ok(&bad));
        // Silent and unknown units: nothing on the bus.
        write(bus, &rtu::read_request(unit("ser-silent"), PT)).await;
        write(bus, &rtu::read_request(42, PT)).await;
        assert_eq!(read_within(bus, 1, CLIENT_TIMEOUT).await, None);
        sim.stop().await;
    })
    .await;
}

async fn write<S: AsyncWrite + Unpin>(bus: &mut S, frame: &[u8]) {
    bus.write_all(frame).await.unwrap();
}

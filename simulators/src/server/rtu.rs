//! Modbus RTU on a byte stream: an RTU-over-TCP connection or a serial
//! port, with several meters on the bus told apart by unit id.
//!
//! Framing ([`Framer`], pure): a request of FC01..FC06 is complete at 8
//! bytes and FC15/FC16 at the length their byte count gives; any other
//! frame ends at the bus's inter-frame silence (3.5 character times).
//!
//! Invariants, as on a real RS-485 bus:
//! - only a frame with a valid CRC addressed to a unit on this bus is
//!   answered; a bad CRC, an unknown unit or the broadcast address 0 get
//!   silence;
//! - after a frame with a bad CRC (or more than 256 bytes without a
//!   silence) everything up to the next silence is dropped, which is how
//!   real slaves find the start of the next frame again;
//! - replies are written whole, one at a time; a delayed reply
//!   (`slow_reply`/`late_reply`) does not hold up the replies of other
//!   units, and a late reply is written whenever its delay ends, even if
//!   other requests were answered meanwhile: the hazard a gateway must
//!   survive. At most [`MAX_DELAYED_REPLIES`] wait at once per stream.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::profile::FunctionCode;
use facwatch_proto::rtu;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::answer::{answer, Reply, Request};
use super::{Bus, MAX_CONNECTIONS_PER_ENDPOINT, RETRY_DELAY};

/// Longest RTU frame (Modbus serial line guide).
const MAX_FRAME_BYTES: usize = 256;
/// Replies waiting out a delay fault at once on one stream; further ones
/// are dropped (a gateway retrying a late meter that fast is broken).
const MAX_DELAYED_REPLIES: usize = 32;

/// Splits a byte stream into request frames.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    buffer: Vec<u8>,
    /// Dropping bytes until the next silence.
    discarding: bool,
}

impl Framer {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.discarding {
            return;
        }
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() > MAX_FRAME_BYTES {
            self.drop_until_silence();
        }
    }

    /// The next frame complete by its length, if its CRC is valid.
    pub(crate) fn next_frame(&mut self) -> Option<Vec<u8>> {
        let length = request_length(&self.buffer)?;
        if self.buffer.len() < length {
            return None;
        }
        let frame: Vec<u8> = self.buffer.drain(..length).collect();
        if rtu::crc_ok(&frame) {
            Some(frame)
        } else {
            self.drop_until_silence();
            None
        }
    }

    /// Whether a silence would end something (a partial frame, or bytes
    /// being dropped).
    pub(crate) fn awaits_silence(&self) -> bool {
        self.discarding || !self.buffer.is_empty()
    }

    /// The bus fell silent: what was buffered is a frame, used if its CRC
    /// is valid.
    pub(crate) fn silence(&mut self) -> Option<Vec<u8>> {
        self.discarding = false;
        let frame = std::mem::take(&mut self.buffer);
        rtu::crc_ok(&frame).then_some(frame)
    }

    fn drop_until_silence(&mut self) {
        self.buffer.clear();
        self.discarding = true;
    }
}

/// The length of a request frame starting `bytes`, where its function
/// code fixes it and enough has arrived to tell.
fn request_length(bytes: &[u8]) -> Option<usize> {
    match *bytes.get(1)? {
        1..=6 => Some(8),
        // unit fc address(2) quantity(2) byte-count data.. crc(2)
        15 | 16 => Some(9 + usize::from(*bytes.get(6)?)),
        _ => None,
    }
}

/// The reply frame to a request frame (valid CRC) at virtual time
/// `at_ms`, and how long to wait before sending it; `None` for silence.
pub(crate) fn respond(bus: &Bus, frame: &[u8], at_ms: i64) -> Option<(Vec<u8>, Duration)> {
    let (&unit, rest) = frame.split_first()?;
    let &function = rest.first()?;
    let Some(meter) = bus.units.get(&unit) else {
        debug!(bus = %bus.name, unit, "No meter with this unit id; not answering.");
        return None;
    };
    if function & 0x80 != 0 {
        // An exception reply, not a request.
        return None;
    }
    let request = match FunctionCode::from_code(function) {
        Some(read_function) => {
            // A read of another length is malformed: real meters ignore it.
            let read = rtu::parse_read_request(frame).ok()?;
            Request::Read {
                function: read_function,
                address: read.address,
                count: read.count,
            }
        }
        None => Request::Other { function },
    };
    let answer = answer(meter, &bus.plant, &bus.scenario, request, at_ms);
    let mut bytes = match answer.reply {
        Reply::Silence => {
            debug!(meter = %meter.id, "Meter is silent (scenario fault); not answering.");
            return None;
        }
        Reply::Words { function, words } => rtu::read_response(unit, function, &words),
        Reply::Exception(code) => rtu::exception_response(unit, function, code),
    };
    if answer.corrupt_crc {
        debug!(meter = %meter.id, "Meter answers with a bad CRC (scenario fault).");
        let crc = bytes.len() - 2;
        bytes[crc] ^= 0xFF;
        bytes[crc + 1] ^= 0xFF;
    }
    Some((bytes, answer.delay))
}

/// Serves RTU requests on `stream` until it closes, fails or `shutdown`.
/// Replies still waiting out a delay are dropped with the stream.
pub(crate) async fn serve_stream<S>(
    stream: S,
    bus: Arc<Bus>,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let writer = Arc::new(Mutex::new(writer));
    let mut framer = Framer::default();
    let mut delayed: JoinSet<io::Result<()>> = JoinSet::new();
    let mut chunk = [0u8; 512];
    let mut last_byte = Instant::now();
    loop {
        let mut frames = Vec::new();
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            Some(sent) = delayed.join_next(), if !delayed.is_empty() => {
                if let Ok(Err(e)) = sent {
                    return Err(e);
                }
            }
            read = reader.read(&mut chunk) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                last_byte = Instant::now();
                framer.push(&chunk[..n]);
                while let Some(frame) = framer.next_frame() {
                    frames.push(frame);
                }
            }
            () = tokio::time::sleep_until(last_byte + bus.silence), if framer.awaits_silence() => {
                frames.extend(framer.silence());
            }
        }
        for frame in frames {
            let Some((reply, delay)) = respond(&bus, &frame, bus.now.now_ms()) else {
                continue;
            };
            if delay.is_zero() {
                write_frame(&writer, &reply).await?;
            } else if delayed.len() < MAX_DELAYED_REPLIES {
                let writer = Arc::clone(&writer);
                delayed.spawn(async move {
                    tokio::time::sleep(delay).await;
                    write_frame(&writer, &reply).await
                });
            } else {
                warn!(bus = %bus.name, "Too many delayed replies waiting; dropping one.");
            }
        }
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(writer: &Mutex<W>, frame: &[u8]) -> io::Result<()> {
    let mut writer = writer.lock().await;
    writer.write_all(frame).await?;
    writer.flush().await
}

/// Serves `bus` as RTU over TCP: every connection on `listener` is an RTU
/// byte stream, as a transparent serial device server forwards it. Stops
/// at `shutdown`, closing the connections.
pub(super) async fn serve_listener(
    listener: TcpListener,
    bus: Arc<Bus>,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_ENDPOINT));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        warn!(bus = %bus.name, %peer, limit = MAX_CONNECTIONS_PER_ENDPOINT, "Too many connections; closing the new one.");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    debug!(bus = %bus.name, %peer, "Accepted an RTU-over-TCP connection.");
                    let bus = Arc::clone(&bus);
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        let _permit = permit;
                        if let Err(e) = serve_stream(stream, Arc::clone(&bus), shutdown).await {
                            debug!(bus = %bus.name, %peer, error = %e, "RTU-over-TCP connection ended.");
                        }
                    });
                }
                Err(e) => {
                    warn!(bus = %bus.name, error = %e, "Accepting a connection failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::{demo_ms, deploy_site, with_faults};
    use crate::scenario::Scenario;
    use facwatch_proto::profile::RegisterRead;
    use tokio::io::{duplex, DuplexStream};

    const FC3: FunctionCode = FunctionCode::ReadHoldingRegisters;
    const FC4: FunctionCode = FunctionCode::ReadInputRegisters;
    const LIMIT: Duration = Duration::from_secs(10);

    /// DOMAIN.md's example: DTSU666 unit 1, total active power Pt.
    const DTSU666_PT: [u8; 8] = [0x01, 0x03, 0x20, 0x12, 0x00, 0x02, 0x6F, 0xCE];

    fn request(unit: u8, function: FunctionCode, address: u16, count: u16) -> Vec<u8> {
        rtu::read_request(
            unit,
            RegisterRead {
                function,
                address,
                count,
            },
        )
    }

    /// Line 1 of the demo at 16:10, when its spray pump (unit 2) answers
    /// 400 ms late, its condenser (unit 3) with a bad CRC and its HV ESP
    /// (unit 4) 100 ms slow.
    fn faulty_line1() -> Bus {
        let text = with_faults(
            "kind = \"late_reply\"\nmeters = [\"l1-spray-pump\"]\ndelay_ms = 400
            ----
            kind = \"bad_crc\"\nmeters = [\"l1-condenser\"]
            ----
            kind = \"slow_reply\"\nmeters = [\"l1-hv-esp\"]\ndelay_ms = 100",
        );
        let scenario = Scenario::from_toml(&text, "s.toml", deploy_site()).unwrap();
        Bus::line1(scenario, demo_ms("16:10:00"))
    }

    fn frames(framer: &mut Framer) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| framer.next_frame()).collect()
    }

    #[test]
    fn reads_are_framed_by_length_across_chunks_and_back_to_back() {
        let mut framer = Framer::default();
        framer.push(&DTSU666_PT[..3]);
        assert_eq!(frames(&mut framer), Vec::<Vec<u8>>::new());
        assert!(framer.awaits_silence());
        let second = request(2, FC4, 0x34, 2);
        let mut rest = DTSU666_PT[3..].to_vec();
        rest.extend_from_slice(&second);
        framer.push(&rest);
        assert_eq!(frames(&mut framer), vec![DTSU666_PT.to_vec(), second]);
        assert!(!framer.awaits_silence());
    }

    #[test]
    fn writes_are_framed_by_their_byte_count() {
        // FC16: unit fc address(2) quantity(2) byte count, 2 words, CRC.
        let mut frame = vec![
            0x01, 0x10, 0x00, 0x06, 0x00, 0x02, 0x04, 0x00, 0x28, 0x00, 0x0A,
        ];
        frame.extend_from_slice(&rtu::crc16(&frame).to_le_bytes());
        let mut framer = Framer::default();
        framer.push(&frame[..10]);
        assert_eq!(frames(&mut framer), Vec::<Vec<u8>>::new());
        framer.push(&frame[10..]);
        assert_eq!(frames(&mut framer), vec![frame]);
    }

    #[test]
    fn other_functions_end_at_the_silence() {
        // FC17 (report server id) is unit, fc, CRC: no length to go by.
        let mut frame = vec![0x01, 0x11];
        frame.extend_from_slice(&rtu::crc16(&frame).to_le_bytes());
        let mut framer = Framer::default();
        framer.push(&frame);
        assert_eq!(frames(&mut framer), Vec::<Vec<u8>>::new());
        assert_eq!(framer.silence(), Some(frame));
        assert!(!framer.awaits_silence());
        // A fragment cut off by the silence is not a frame.
        framer.push(&DTSU666_PT[..5]);
        assert_eq!(framer.silence(), None);
    }

    #[test]
    fn a_bad_crc_drops_everything_until_the_silence() {
        let mut bad = DTSU666_PT;
        bad[7] ^= 0x01;
        let mut framer = Framer::default();
        framer.push(&bad);
        // A good request right behind it is lost too: the slave cannot
        // know where it starts.
        framer.push(&DTSU666_PT);
        assert_eq!(frames(&mut framer), Vec::<Vec<u8>>::new());
        assert!(framer.awaits_silence());
        assert_eq!(framer.silence(), None);
        framer.push(&DTSU666_PT);
        assert_eq!(frames(&mut framer), vec![DTSU666_PT.to_vec()]);
    }

    #[test]
    fn runaway_bytes_without_a_silence_are_dropped() {
        let mut framer = Framer::default();
        framer.push(&[0x01, 0x41]);
        framer.push(&[0x55; MAX_FRAME_BYTES]);
        assert!(framer.awaits_silence());
        framer.push(&DTSU666_PT);
        assert_eq!(frames(&mut framer), Vec::<Vec<u8>>::new());
        assert_eq!(framer.silence(), None);
    }

    #[test]
    fn the_addressed_meter_answers_with_its_registers() {
        let bus = faulty_line1();
        let at = demo_ms("10:00:00");
        let (reply, delay) = respond(&bus, &DTSU666_PT, at).unwrap();
        assert_eq!(delay, Duration::ZERO);
        assert_eq!(reply.len(), 9);
        assert_eq!(reply[..3], [0x01, 0x03, 0x04]);
        assert!(rtu::crc_ok(&reply));
        let raw = f32::from_be_bytes([reply[3], reply[4], reply[5], reply[6]]);
        let expected = bus
            .plant
            .values("l1-stenter", at)
            .unwrap()
            .power_kw
            .unwrap();
        // Secondary side with CT 40: P = raw * CT * 0.1 W.
        assert!((f64::from(raw) * 40.0 * 0.1 / 1000.0 - f64::from(expected)).abs() < 1e-3);
    }

    #[test]
    fn unknown_units_broadcasts_and_replies_get_silence() {
        let bus = faulty_line1();
        let at = demo_ms("10:00:00");
        assert_eq!(respond(&bus, &request(9, FC3, 0x2012, 2), at), None);
        assert_eq!(respond(&bus, &request(0, FC3, 0x2012, 2), at), None);
        // Another slave's exception reply on the bus is not a request.
        assert_eq!(respond(&bus, &rtu::exception_response(1, 3, 2), at), None);
    }

    #[test]
    fn refused_requests_get_exception_frames() {
        let bus = faulty_line1();
        let at = demo_ms("10:00:00");
        let exception = |unit, function, code| {
            Some((
                rtu::exception_response(unit, function, code),
                Duration::ZERO,
            ))
        };
        // DTSU666 reads with FC03 only.
        assert_eq!(
            respond(&bus, &request(1, FC4, 0x2012, 2), at),
            exception(1, 4, 1)
        );
        assert_eq!(
            respond(&bus, &request(1, FC3, 0x3000, 2), at),
            exception(1, 3, 2)
        );
        assert_eq!(
            respond(&bus, &request(1, FC3, 0x2000, 126), at),
            exception(1, 3, 3)
        );
        let mut report_id = vec![0x01, 0x11];
        report_id.extend_from_slice(&rtu::crc16(&report_id).to_le_bytes());
        assert_eq!(respond(&bus, &report_id, at), exception(1, 0x11, 1));
        assert_eq!(
            exception(1, 0x11, 1).unwrap().0,
            [0x01, 0x91, 0x01, 0x8C, 0x50]
        );
    }

    #[test]
    fn reply_faults_delay_or_corrupt_the_frame() {
        let bus = faulty_line1();
        let at = demo_ms("16:10:00");
        let (late, delay) = respond(&bus, &request(2, FC4, 0x34, 2), at).unwrap();
        assert_eq!(delay, Duration::from_millis(400));
        assert!(rtu::crc_ok(&late));
        let (slow, delay) = respond(&bus, &request(4, FC4, 0x34, 2), at).unwrap();
        assert_eq!(delay, Duration::from_millis(100));
        assert!(rtu::crc_ok(&slow));
        let (corrupt, delay) = respond(&bus, &request(3, FC4, 0x34, 2), at).unwrap();
        assert_eq!(delay, Duration::ZERO);
        assert_eq!(corrupt[..3], [0x03, 0x04, 0x04]);
        assert!(!rtu::crc_ok(&corrupt));
        let mut repaired = corrupt.clone();
        repaired[7] ^= 0xFF;
        repaired[8] ^= 0xFF;
        assert!(rtu::crc_ok(&repaired));
        // Outside the window the meters are healthy.
        let (reply, delay) = respond(&bus, &request(3, FC4, 0x34, 2), demo_ms("16:20:00")).unwrap();
        assert_eq!(delay, Duration::ZERO);
        assert!(rtu::crc_ok(&reply));
    }

    /// Serves `bus` on one end of an in-memory stream; returns the other.
    fn serve_in_memory(bus: Bus) -> (DuplexStream, CancellationToken) {
        let (client, server) = duplex(1024);
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_stream(server, Arc::new(bus), shutdown.clone()));
        (client, shutdown)
    }

    async fn read_frame(stream: &mut DuplexStream, length: usize) -> Vec<u8> {
        let mut frame = vec![0; length];
        stream.read_exact(&mut frame).await.unwrap();
        frame
    }

    #[tokio::test]
    async fn a_stream_answers_good_frames_and_ignores_bad_ones() {
        tokio::time::timeout(LIMIT, async {
            let (mut client, shutdown) = serve_in_memory(Bus::line1(
                Scenario::from_toml(
                    crate::scenario::tests::DEPLOY_SCENARIO,
                    "s.toml",
                    deploy_site(),
                )
                .unwrap(),
                demo_ms("10:00:00"),
            ));
            let mut bad = DTSU666_PT;
            bad[6] ^= 0x01;
            // Bad CRC, unknown unit, FC17: silence, exception 01 only for
            // the last, then the read is answered.
            client.write_all(&bad).await.unwrap();
            // The bus must fall silent before the slave listens again.
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&request(9, FC3, 0x2012, 2)).await.unwrap();
            let mut report_id = vec![0x01, 0x11];
            report_id.extend_from_slice(&rtu::crc16(&report_id).to_le_bytes());
            client.write_all(&report_id).await.unwrap();
            assert_eq!(
                read_frame(&mut client, 5).await,
                rtu::exception_response(1, 0x11, 1)
            );
            client.write_all(&DTSU666_PT).await.unwrap();
            let reply = read_frame(&mut client, 9).await;
            assert_eq!(reply[..3], [0x01, 0x03, 0x04]);
            assert!(rtu::crc_ok(&reply));
            // Nothing else was sent.
            let mut more = [0u8; 1];
            assert!(
                tokio::time::timeout(Duration::from_millis(50), client.read(&mut more))
                    .await
                    .is_err()
            );
            shutdown.cancel();
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_late_reply_arrives_after_other_units_answered() {
        tokio::time::timeout(LIMIT, async {
            let (mut client, shutdown) = serve_in_memory(faulty_line1());
            let asked = Instant::now();
            client.write_all(&request(2, FC4, 0x34, 2)).await.unwrap();
            // The gateway gives up on unit 2 and asks unit 1, which answers
            // at once: the bus is not held up by the late meter.
            let mut first = [0u8; 1];
            assert!(
                tokio::time::timeout(Duration::from_millis(150), client.read(&mut first))
                    .await
                    .is_err()
            );
            client.write_all(&DTSU666_PT).await.unwrap();
            let reply = read_frame(&mut client, 9).await;
            assert_eq!(reply[..3], [0x01, 0x03, 0x04]);
            assert!(asked.elapsed() < Duration::from_millis(400));
            // Then unit 2's late answer arrives on the same stream.
            let late = read_frame(&mut client, 9).await;
            assert!(asked.elapsed() >= Duration::from_millis(400));
            assert_eq!(late[..3], [0x02, 0x04, 0x04]);
            assert!(rtu::crc_ok(&late));
            shutdown.cancel();
        })
        .await
        .unwrap();
    }
}

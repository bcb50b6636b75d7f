//! One bus link and the reads of one poll over it.
//!
//! A [`BusLink`] is the line shared by the meters of one bus: a Modbus TCP
//! connection, a TCP connection carrying RTU frames (a serial device
//! server), or a local serial port carrying RTU frames. It sends one request
//! at a time and switches the unit id per request, so all meters of the bus
//! share it.
//!
//! Invariants:
//! - every connect/open and every request is bounded by the caller's
//!   timeout (tokio-modbus has none of its own);
//! - on RTU links, a request is sent no sooner than the inter-frame silence
//!   (3.5 character times) after the previous transaction ended, whether it
//!   ended with an answer or with a timeout (tokio-modbus's RTU framing does
//!   not wait for it);
//! - a late reply is never taken as the answer to a later request: after a
//!   timeout, a transport error or a garbled answer, a TCP connection is
//!   dropped and the next request connects afresh; a serial port stays open
//!   (reopening it would reset the line and may drop the adapter), but the
//!   tokio-modbus context over it is rebuilt. On every RTU link (serial or
//!   over TCP) the bytes waiting in the input are discarded before each
//!   request, since nothing unasked-for can be the answer to the request
//!   about to be sent, and after a timeout the next request waits, beyond
//!   the silence, for the time the missing reply takes on the wire, so a
//!   reply that was merely late has arrived, and is discarded, before the
//!   next request goes out (an RTU answer names only unit and function, so
//!   a late reply to the same read would otherwise pass for the answer to
//!   its retry);
//! - a Modbus exception is a complete, well-framed answer ("the device said
//!   no"): it keeps the connection;
//! - a transport error on a connection that had been idle since an earlier
//!   poll (device servers drop idle connections) is retried once on a fresh
//!   connection before the meter counts as unreachable.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use facwatch_proto::profile::{self, FunctionCode, ReadResult, RegisterRead};
use facwatch_proto::site::{Meter, SerialLine, Transport};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_modbus::client::{rtu, tcp, Client as _, Context};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_modbus::{Request, Response};
use tokio_serial::{SerialPort as _, SerialPortBuilderExt as _};

/// Why a read did not produce register words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadFailure {
    /// No answer within the timeout.
    Timeout { read: RegisterRead, after: Duration },
    /// The device answered with a Modbus exception.
    Exception { read: RegisterRead, code: u8 },
    /// The link could not be opened or failed.
    Unreachable(String),
    /// An answer that does not fit the request.
    Garbled(String),
}

/// The shared line of one bus, (re)connected lazily.
pub(crate) struct BusLink {
    transport: Transport,
    silence: Duration,
    context: Option<Context>,
    /// A serial port outlives the contexts built over it.
    serial: Option<SharedPort>,
    /// When the last transaction ended: the next request waits for the
    /// inter-frame silence after it.
    quiet_since: Option<Instant>,
}

impl BusLink {
    pub(crate) fn new(transport: Transport) -> BusLink {
        BusLink {
            silence: transport.inter_frame_silence(),
            transport,
            context: None,
            serial: None,
            quiet_since: None,
        }
    }

    /// The bus's name, for messages.
    pub(crate) fn bus(&self) -> String {
        self.transport.bus()
    }

    /// Reads `read` from `unit`, waiting at most `limit` for the link to
    /// open and again at most `limit` for the answer.
    pub(crate) async fn read(
        &mut self,
        unit: u8,
        read: RegisterRead,
        limit: Duration,
    ) -> Result<Vec<u16>, ReadFailure> {
        let mut may_retry_on_fresh_link = true;
        loop {
            if let Some(quiet_since) = self.quiet_since {
                let deadline = quiet_since + self.silence;
                // A timer that has already expired still costs a trip
                // through the timer wheel: skip it on TCP and idle buses.
                if Instant::now() < deadline {
                    tokio::time::sleep_until(deadline).await;
                }
            }
            let reused = self.context.is_some();
            if !reused {
                self.open(unit, limit)
                    .await
                    .map_err(ReadFailure::Unreachable)?;
            }
            if let Some(port) = &self.serial {
                port.discard_input();
            }
            let Some(context) = self.context.as_mut() else {
                return Err(ReadFailure::Unreachable(format!(
                    "{} is not open",
                    self.bus()
                )));
            };
            context.set_slave(Slave(unit));
            // `Client::call`, not `Reader::read_*_registers`: those
            // `debug_assert` the register count of the answer, so a meter
            // answering with too few registers would panic a debug build
            // instead of reaching the `Garbled` check below.
            let request = match read.function {
                FunctionCode::ReadHoldingRegisters => {
                    Request::ReadHoldingRegisters(read.address, read.count)
                }
                FunctionCode::ReadInputRegisters => {
                    Request::ReadInputRegisters(read.address, read.count)
                }
            };
            let answer = timeout(limit, context.call(request)).await.map(|called| {
                called.map(|answered| {
                    answered.map(|response| match response {
                        Response::ReadHoldingRegisters(words)
                        | Response::ReadInputRegisters(words) => words,
                        // tokio-modbus refuses a response of another
                        // function as a protocol error before this; no
                        // words would be garbled below anyway.
                        _ => Vec::new(),
                    })
                })
            });
            self.quiet_since = Some(Instant::now());
            match answer {
                Err(_) => {
                    // The reply may still arrive: never read this stream
                    // again, and let the reply pass before the next request.
                    self.drop_connection();
                    self.quiet_since = Some(Instant::now() + self.reply_time(read.count));
                    return Err(ReadFailure::Timeout { read, after: limit });
                }
                Ok(Err(tokio_modbus::Error::Transport(e))) => {
                    self.drop_connection();
                    // A serial port that fails I/O is reopened too.
                    self.serial = None;
                    if reused && may_retry_on_fresh_link {
                        may_retry_on_fresh_link = false;
                        continue;
                    }
                    return Err(ReadFailure::Unreachable(format!(
                        "link {} failed: {e}",
                        self.bus()
                    )));
                }
                Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                    self.drop_connection();
                    return Err(ReadFailure::Garbled(e.to_string()));
                }
                Ok(Ok(Err(exception))) => {
                    return Err(ReadFailure::Exception {
                        read,
                        code: u8::from(exception),
                    })
                }
                Ok(Ok(Ok(words))) if words.len() != usize::from(read.count) => {
                    self.drop_connection();
                    return Err(ReadFailure::Garbled(format!(
                        "asked for {} registers at {:#06x}, got {}",
                        read.count,
                        read.address,
                        words.len()
                    )));
                }
                Ok(Ok(Ok(words))) => return Ok(words),
            }
        }
    }

    /// How long the answer to a read of `count` registers takes on an RTU
    /// line (unit, function, byte count, words, CRC; 11 bits a character).
    fn reply_time(&self, count: u16) -> Duration {
        let baud = match &self.transport {
            Transport::Tcp(_) => return Duration::ZERO,
            Transport::RtuOverTcp { baud, .. } => *baud,
            Transport::Serial(line) => line.baud,
        };
        let characters = 5.0 + 2.0 * f64::from(count);
        Duration::from_secs_f64(characters * 11.0 / f64::from(baud.max(1)))
    }

    fn drop_connection(&mut self) {
        self.context = None;
    }

    async fn open(&mut self, unit: u8, limit: Duration) -> Result<(), String> {
        let slave = Slave(unit);
        let context = match &self.transport {
            Transport::Tcp(address) => tcp::attach_slave(connect(*address, limit).await?, slave),
            Transport::RtuOverTcp { address, .. } => {
                rtu::attach_slave(DiscardStale(connect(*address, limit).await?), slave)
            }
            Transport::Serial(line) => {
                let port = match &self.serial {
                    Some(port) => port.clone(),
                    None => self.serial.insert(SharedPort::open(line)?).clone(),
                };
                rtu::attach_slave(port, slave)
            }
        };
        self.context = Some(context);
        Ok(())
    }
}

async fn connect(address: std::net::SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    match timeout(limit, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            // Requests are small and answered one at a time: send at once.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(format!("cannot connect to {address}: {e}")),
        Err(_) => Err(format!(
            "connect to {address} timed out after {} ms",
            limit.as_millis()
        )),
    }
}

/// A TCP stream carrying RTU frames that drops whatever bytes wait
/// unread before it writes: RTU is strictly request-then-answer, so bytes
/// received before a request (a late reply a device server held back) are
/// never its answer. Discarding happens before every write call; an answer
/// cannot arrive between the writes of one request.
#[derive(Debug)]
struct DiscardStale(TcpStream);

impl AsyncRead for DiscardStale {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for DiscardStale {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut stale = [0u8; 256];
        // Ok(0) is the peer closing: the write (or the read after it) says so.
        while let Ok(1..) = self.0.try_read(&mut stale) {}
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A serial port shared by the link (to discard input) and the
/// tokio-modbus context built over it. Only one task ever uses it and the
/// lock is held for one non-blocking call at a time.
#[derive(Clone, Debug)]
struct SharedPort(Arc<Mutex<tokio_serial::SerialStream>>);

impl SharedPort {
    fn open(line: &SerialLine) -> Result<SharedPort, String> {
        let parity = match line.parity {
            profile::Parity::None => tokio_serial::Parity::None,
            profile::Parity::Even => tokio_serial::Parity::Even,
            profile::Parity::Odd => tokio_serial::Parity::Odd,
        };
        let data_bits = match line.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        };
        let stop_bits = match line.stop_bits {
            2 => tokio_serial::StopBits::Two,
            _ => tokio_serial::StopBits::One,
        };
        let stream = tokio_serial::new(&line.path, line.baud)
            .parity(parity)
            .data_bits(data_bits)
            .stop_bits(stop_bits)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()
            .map_err(|e| format!("cannot open serial port {}: {e}", line.path))?;
        Ok(SharedPort(Arc::new(Mutex::new(stream))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, tokio_serial::SerialStream> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every byte received and not yet read.
    fn discard_input(&self) {
        if let Err(e) = self.lock().clear(tokio_serial::ClearBuffer::Input) {
            tracing::debug!(error = %e, "Cannot clear the serial input buffer.");
        }
    }
}

impl AsyncRead for SharedPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// Reads every register block of `meter`'s profile over `link`, one request
/// at a time. A read that times out is sent again while the poll has
/// attempts left (`attempts` counts requests after timeouts for the whole
/// poll, at least one); any other failure ends the poll.
pub(crate) async fn read_meter(
    link: &mut BusLink,
    meter: &Meter,
    attempts: u32,
) -> Result<Vec<ReadResult>, ReadFailure> {
    let mut retries_left = attempts.saturating_sub(1);
    let mut results = Vec::new();
    for read in meter.profile.reads(meter.read_limits) {
        let words = loop {
            match link.read(meter.unit, read, meter.timeout).await {
                Err(ReadFailure::Timeout { .. }) if retries_left > 0 => retries_left -= 1,
                other => break other?,
            }
        };
        results.push(ReadResult {
            function: read.function,
            address: read.address,
            words,
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use facwatch_proto::profile::{Profile, ProfileName, Ratios, ReadLimits};
    use facwatch_proto::rtu;
    use facwatch_proto::wire::Values;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn values(power_kw: f32) -> Values {
        Values {
            power_kw: Some(power_kw),
            energy_kwh: Some(10.0),
            voltage_v: vec![230.0; 3],
            current_a: vec![20.0; 3],
            power_factor: Some(0.5),
        }
    }

    fn meter(transport: Transport, unit: u8) -> Meter {
        Meter {
            id: "m".into(),
            gateway: "gw".into(),
            profile: Profile::builtin(ProfileName::Sdm630),
            transport,
            unit,
            ratios: Ratios::default(),
            // One read per poll.
            read_limits: ReadLimits {
                max_registers: 125,
                max_gap: 125,
            },
            timeout: TIMEOUT,
            retries: 0,
        }
    }

    /// What the fake RTU line does with each request, in order.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// Answers at once with `values(power)`.
        Answer(f32),
        /// Answers with `values(power)` after three timeouts.
        Late(f32),
        /// Answers with an exception.
        Refuse(u8),
        /// Answers with only the first register asked for.
        Short,
        /// Closes the connection without answering.
        Hang,
        /// Answers with `values(power)`; when told, sends the same frame
        /// showing `stale` kW unasked (a device server replaying a buffered
        /// frame), then tells that it did.
        AnswerThenStale(f32, f32),
    }

    /// An SDM630 behind a serial device server (RTU over TCP) playing
    /// `steps`; returns its address and the count of connections accepted.
    async fn rtu_over_tcp(steps: Vec<Step>) -> (SocketAddr, Arc<AtomicUsize>) {
        let (address, connections, _) = rtu_over_tcp_telling(steps).await;
        (address, connections)
    }

    /// [`rtu_over_tcp`], with a pair of signals for stale frames: notify
    /// the first to have one sent, wait on the second for it to be sent.
    async fn rtu_over_tcp_telling(
        steps: Vec<Step>,
    ) -> (SocketAddr, Arc<AtomicUsize>, StaleSignals) {
        let signals: StaleSignals =
            Arc::new((tokio::sync::Notify::new(), tokio::sync::Notify::new()));
        let telling = Arc::clone(&signals);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let steps = Arc::new(Mutex::new(VecDeque::from(steps)));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let steps = Arc::clone(&steps);
                let telling = Arc::clone(&telling);
                tokio::spawn(async move {
                    let mut frame = [0u8; 8];
                    while stream.read_exact(&mut frame).await.is_ok() {
                        let request = rtu::parse_read_request(&frame).unwrap();
                        let function = FunctionCode::from_code(request.function).unwrap();
                        let step = steps.lock().unwrap().pop_front().unwrap_or(Step::Hang);
                        let answer = |power| {
                            let image = Profile::builtin(ProfileName::Sdm630)
                                .encode(&values(power), Ratios::default());
                            let words: Vec<u16> = (request.address
                                ..request.address + request.count)
                                .map(|a| {
                                    image
                                        .iter()
                                        .find(|(_, r, _)| *r == a)
                                        .map_or(0, |(_, _, w)| *w)
                                })
                                .collect();
                            rtu::read_response(request.unit, function, &words)
                        };
                        let reply = match step {
                            Step::Answer(power) => answer(power),
                            Step::Late(power) => {
                                tokio::time::sleep(TIMEOUT * 3).await;
                                answer(power)
                            }
                            Step::Refuse(code) => {
                                rtu::exception_response(request.unit, request.function, code)
                            }
                            Step::Short => rtu::read_response(request.unit, function, &[0x4000]),
                            Step::Hang => return,
                            Step::AnswerThenStale(power, _) => answer(power),
                        };
                        if stream.write_all(&reply).await.is_err() {
                            return;
                        }
                        if let Step::AnswerThenStale(_, stale) = step {
                            telling.0.notified().await;
                            if stream.write_all(&answer(stale)).await.is_err() {
                                return;
                            }
                            telling.1.notify_one();
                        }
                    }
                });
            }
        });
        (address, connections, signals)
    }

    type StaleSignals = Arc<(tokio::sync::Notify, tokio::sync::Notify)>;

    fn rtu_meter(address: SocketAddr) -> Meter {
        meter(
            Transport::RtuOverTcp {
                address,
                baud: 115_200,
            },
            1,
        )
    }

    async fn power(link: &mut BusLink, meter: &Meter, attempts: u32) -> Result<f32, ReadFailure> {
        let results = read_meter(link, meter, attempts).await?;
        Ok(meter
            .profile
            .decode(&results, meter.ratios)
            .unwrap()
            .power_kw
            .unwrap())
    }

    fn bounded<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
        tokio::time::timeout(Duration::from_secs(10), f)
    }

    #[tokio::test]
    async fn a_late_reply_never_answers_the_next_request() {
        bounded(async {
            let (address, connections) =
                rtu_over_tcp(vec![Step::Late(1.0), Step::Answer(2.0)]).await;
            let meter = rtu_meter(address);
            let mut link = BusLink::new(meter.transport.clone());
            assert!(matches!(
                power(&mut link, &meter, 1).await,
                Err(ReadFailure::Timeout { after: TIMEOUT, .. })
            ));
            // The 1 kW reply is still on its way; the next poll must read
            // the meter afresh (2 kW) on a new connection.
            assert_eq!(power(&mut link, &meter, 1).await, Ok(2.0));
            assert_eq!(connections.load(Ordering::SeqCst), 2);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_timeout_is_retried_within_the_poll_while_attempts_last() {
        bounded(async {
            let (address, connections) =
                rtu_over_tcp(vec![Step::Late(1.0), Step::Answer(2.0)]).await;
            let meter = rtu_meter(address);
            let mut link = BusLink::new(meter.transport.clone());
            assert_eq!(power(&mut link, &meter, 2).await, Ok(2.0));
            assert_eq!(connections.load(Ordering::SeqCst), 2);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_exception_keeps_the_connection_and_is_not_retried() {
        bounded(async {
            let (address, connections) =
                rtu_over_tcp(vec![Step::Refuse(2), Step::Refuse(4), Step::Answer(3.0)]).await;
            let meter = rtu_meter(address);
            let mut link = BusLink::new(meter.transport.clone());
            for code in [2, 4] {
                match power(&mut link, &meter, 3).await {
                    Err(ReadFailure::Exception { code: got, read }) => {
                        assert_eq!((got, read.address), (code, 0));
                    }
                    other => panic!("expected an exception, got {other:?}"),
                }
            }
            assert_eq!(power(&mut link, &meter, 1).await, Ok(3.0));
            assert_eq!(connections.load(Ordering::SeqCst), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_answer_with_too_few_registers_is_garbled_and_the_link_reopened() {
        // Regression: tokio-modbus's read_*_registers debug_assert the
        // count, so this answer panicked the bus task of a debug build.
        bounded(async {
            let (address, connections) = rtu_over_tcp(vec![Step::Short, Step::Answer(4.0)]).await;
            let meter = rtu_meter(address);
            let mut link = BusLink::new(meter.transport.clone());
            match power(&mut link, &meter, 1).await {
                Err(ReadFailure::Garbled(why)) => {
                    assert!(why.starts_with("asked for "), "{why}");
                    assert!(why.ends_with(", got 1"), "{why}");
                }
                other => panic!("expected a garbled answer, got {other:?}"),
            }
            assert_eq!(power(&mut link, &meter, 1).await, Ok(4.0));
            assert_eq!(connections.load(Ordering::SeqCst), 2);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_connection_dropped_while_idle_is_reopened_once_without_a_failure() {
        bounded(async {
            let (address, connections) =
                rtu_over_tcp(vec![Step::Answer(1.0), Step::Hang, Step::Answer(2.0)]).await;
            let meter = rtu_meter(address);
            let mut link = BusLink::new(meter.transport.clone());
            assert_eq!(power(&mut link, &meter, 1).await, Ok(1.0));
            assert_eq!(power(&mut link, &meter, 1).await, Ok(2.0));
            assert_eq!(connections.load(Ordering::SeqCst), 2);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn bytes_waiting_before_a_request_on_rtu_over_tcp_are_discarded() {
        bounded(async {
            let (address, connections, stale) =
                rtu_over_tcp_telling(vec![Step::AnswerThenStale(1.0, 99.0), Step::Answer(2.0)])
                    .await;
            let meter = rtu_meter(address);
            let mut link = BusLink::new(meter.transport.clone());
            assert_eq!(power(&mut link, &meter, 1).await, Ok(1.0));
            // Sent after the answer was read; on loopback the stale frame
            // is in our socket once written.
            stale.0.notify_one();
            stale.1.notified().await;
            assert_eq!(power(&mut link, &meter, 1).await, Ok(2.0));
            assert_eq!(connections.load(Ordering::SeqCst), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_refused_connection_is_unreachable_and_names_the_address() {
        bounded(async {
            let address = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap()
            };
            for transport in [
                Transport::Tcp(address),
                Transport::RtuOverTcp {
                    address,
                    baud: 9600,
                },
            ] {
                let meter = meter(transport, 1);
                let mut link = BusLink::new(meter.transport.clone());
                match read_meter(&mut link, &meter, 3).await {
                    Err(ReadFailure::Unreachable(why)) => {
                        assert!(why.contains(&address.to_string()), "{why}");
                    }
                    other => panic!("expected unreachable, got {other:?}"),
                }
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_missing_serial_port_is_unreachable_and_named() {
        bounded(async {
            let line = SerialLine {
                path: "/dev/facwatch-no-such-port".into(),
                baud: 9600,
                parity: profile::Parity::None,
                data_bits: 8,
                stop_bits: 1,
            };
            let meter = meter(Transport::Serial(line), 1);
            let mut link = BusLink::new(meter.transport.clone());
            match read_meter(&mut link, &meter, 1).await {
                Err(ReadFailure::Unreachable(why)) => {
                    assert!(
                        why.starts_with("cannot open serial port /dev/facwatch-no-such-port"),
                        "{why}"
                    );
                }
                other => panic!("expected unreachable, got {other:?}"),
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn requests_on_an_rtu_bus_wait_for_the_inter_frame_silence() {
        bounded(async {
            let (address, _) = rtu_over_tcp(vec![Step::Answer(1.0); 4]).await;
            // 1200 baud: 3.5 characters of 11 bits take 32 ms.
            let transport = Transport::RtuOverTcp {
                address,
                baud: 1200,
            };
            let silence = transport.inter_frame_silence();
            assert_eq!(silence.as_micros(), 32_083);
            let meter = meter(transport, 1);
            let mut link = BusLink::new(meter.transport.clone());
            assert_eq!(power(&mut link, &meter, 1).await, Ok(1.0));
            let started = Instant::now();
            for _ in 0..3 {
                assert_eq!(power(&mut link, &meter, 1).await, Ok(1.0));
            }
            assert!(started.elapsed() >= silence * 3, "{:?}", started.elapsed());
        })
        .await
        .unwrap();
    }
}

//! Fake Modbus peers for the gateway's tests: a Modbus TCP server and a
//! serial device server passing RTU frames over TCP (RTU over TCP), both on
//! 127.0.0.1:0, both logging every request with its arrival time and
//! answering as a test-supplied responder says (words, exception, silence,
//! or a late answer).

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facwatch_proto::profile::{Profile, ProfileName, Ratios};
use facwatch_proto::rtu;
use facwatch_proto::wire::Values;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How requests and answers are framed on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Modbus TCP (MBAP header).
    Tcp,
    /// Modbus RTU frames (unit, PDU, CRC) over TCP.
    RtuOverTcp,
}

/// One request as the fake saw it.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// 1-based, in arrival order over all connections.
    pub number: u64,
    pub unit: u8,
    pub function: u8,
    pub address: u16,
    pub count: u16,
    pub at: Instant,
}

/// What the fake does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    Words(Vec<u16>),
    Exception(u8),
    /// No answer at all.
    Silent,
    /// The words, but only after `after`.
    Late {
        words: Vec<u16>,
        after: Duration,
    },
}

/// A request and, if it was answered, the time just before the answer was
/// written.
#[derive(Debug, Clone, Copy)]
pub struct Logged {
    pub request: Request,
    pub answered_at: Option<Instant>,
}

pub type Responder = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

#[derive(Clone)]
pub struct FakeServer {
    pub address: SocketAddr,
    log: Arc<Mutex<Vec<Logged>>>,
    connections: Arc<Mutex<u64>>,
}

impl FakeServer {
    /// Serves on a free port until the test's runtime ends.
    pub async fn start(framing: Framing, responder: Responder) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = FakeServer {
            address: listener.local_addr().unwrap(),
            log: Arc::new(Mutex::new(Vec::new())),
            connections: Arc::new(Mutex::new(0)),
        };
        let accepting = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                *accepting.connections.lock().unwrap() += 1;
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(
                    stream,
                    framing,
                    Arc::clone(&responder),
                    accepting.clone(),
                ));
            }
        });
        server
    }

    pub fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    pub fn connections(&self) -> u64 {
        *self.connections.lock().unwrap()
    }

    fn record(&self, unit: u8, function: u8, address: u16, count: u16) -> (Request, usize) {
        let mut log = self.log.lock().unwrap();
        let request = Request {
            number: log.len() as u64 + 1,
            unit,
            function,
            address,
            count,
            at: Instant::now(),
        };
        log.push(Logged {
            request,
            answered_at: None,
        });
        (request, log.len() - 1)
    }

    fn answered(&self, index: usize) {
        self.log.lock().unwrap()[index].answered_at = Some(Instant::now());
    }
}

async fn serve(mut stream: TcpStream, framing: Framing, responder: Responder, server: FakeServer) {
    loop {
        // (unit, function, address, count, MBAP transaction id)
        let (unit, function, address, count, transaction) = match framing {
            Framing::Tcp => {
                let mut header = [0u8; 7];
                if stream.read_exact(&mut header).await.is_err() {
                    return;
                }
                let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
                let mut pdu = vec![0u8; length.saturating_sub(1)];
                if pdu.len() < 5 || stream.read_exact(&mut pdu).await.is_err() {
                    return;
                }
                (
                    header[6],
                    pdu[0],
                    u16::from_be_bytes([pdu[1], pdu[2]]),
                    u16::from_be_bytes([pdu[3], pdu[4]]),
                    [header[0], header[1]],
                )
            }
            Framing::RtuOverTcp => {
                let mut frame = [0u8; 8];
                if stream.read_exact(&mut frame).await.is_err() {
                    return;
                }
                let Ok(request) = rtu::parse_read_request(&frame) else {
                    return;
                };
                (
                    request.unit,
                    request.function,
                    request.address,
                    request.count,
                    [0, 0],
                )
            }
        };
        let (request, index) = server.record(unit, function, address, count);
        let reply = responder(&request);
        let pdu = match &reply {
            Reply::Silent => continue,
            Reply::Words(words) | Reply::Late { words, .. } => {
                let mut pdu = vec![function, (words.len() * 2) as u8];
                for w in words {
                    pdu.extend_from_slice(&w.to_be_bytes());
                }
                pdu
            }
            Reply::Exception(code) => vec![function | 0x80, *code],
        };
        if let Reply::Late { after, .. } = reply {
            tokio::time::sleep(after).await;
        }
        let frame = match framing {
            Framing::Tcp => {
                let mut frame = transaction.to_vec();
                frame.extend_from_slice(&[0, 0]);
                frame.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
                frame.push(unit);
                frame.extend_from_slice(&pdu);
                frame
            }
            Framing::RtuOverTcp => {
                let mut frame = vec![unit];
                frame.extend_from_slice(&pdu);
                let crc = rtu::crc16(&frame);
                frame.extend_from_slice(&crc.to_le_bytes());
                frame
            }
        };
        server.answered(index);
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// The registers a meter of `profile` shows for `values`, by (function
/// code, address).
pub fn image(profile: ProfileName, values: &Values, ratios: Ratios) -> HashMap<(u8, u16), u16> {
    Profile::builtin(profile)
        .encode(values, ratios)
        .into_iter()
        .map(|(function, address, word)| ((function.code(), address), word))
        .collect()
}

/// `count` words from `address` of an image (0 where nothing is mapped).
pub fn words(image: &HashMap<(u8, u16), u16>, request: &Request) -> Vec<u16> {
    (0..request.count)
        .map(|i| {
            let address = request.address.wrapping_add(i);
            image
                .get(&(request.function, address))
                .copied()
                .unwrap_or(0)
        })
        .collect()
}

//! One Modbus TCP connection and the reads of one poll over it.
//!
//! tokio-modbus has no timeouts of its own, so the connect and every call
//! are wrapped in `tokio::time::timeout`. Invariant: after any timeout or
//! transport/protocol error the connection is dropped, and the next poll
//! connects afresh; a late reply can therefore never be taken as the answer
//! to a later request. A Modbus exception is a complete, well-framed answer
//! ("the device said no"), so it keeps the connection.
//!
//! The connection is not tied to one unit id: it sets the unit before each
//! meter's reads, so several meters behind one serial device server can
//! share it (issue 3).

use std::net::SocketAddr;
use std::time::Duration;

use facwatch_proto::profile::{FunctionCode, ReadResult};
use facwatch_proto::site::Meter;
use tokio::time::timeout;
use tokio_modbus::client::{tcp, Context, Reader};
use tokio_modbus::slave::{Slave, SlaveContext};

use super::sample::PollOutcome;

/// A lazily (re)connected Modbus TCP link to one endpoint.
pub(crate) struct ModbusLink {
    address: SocketAddr,
    timeout: Duration,
    context: Option<Context>,
}

/// Why a read did not produce register words.
enum ReadFailure {
    Timeout,
    Exception(u8),
    Transport(std::io::Error),
    Protocol(String),
}

impl ModbusLink {
    pub(crate) fn new(address: SocketAddr, timeout: Duration) -> ModbusLink {
        ModbusLink {
            address,
            timeout,
            context: None,
        }
    }

    /// Reads and decodes every register block of `meter`'s profile.
    pub(crate) async fn poll(&mut self, meter: &Meter) -> PollOutcome {
        let context = match self.context.as_mut() {
            Some(context) => context,
            None => {
                let connect = tcp::connect_slave(self.address, Slave(meter.unit));
                match timeout(self.timeout, connect).await {
                    Ok(Ok(context)) => self.context.insert(context),
                    Ok(Err(e)) => {
                        return PollOutcome::Unreachable(format!(
                            "cannot connect to {}: {e}",
                            self.address
                        ))
                    }
                    Err(_) => {
                        return PollOutcome::Unreachable(format!(
                            "connect to {} timed out after {:?}",
                            self.address, self.timeout
                        ))
                    }
                }
            }
        };
        context.set_slave(Slave(meter.unit));

        let profile = &meter.profile;
        let mut results = Vec::new();
        for read in profile.reads(meter.read_limits) {
            match read_registers(
                context,
                read.function,
                read.address,
                read.count,
                self.timeout,
            )
            .await
            {
                Ok(words) => results.push(ReadResult {
                    function: read.function,
                    address: read.address,
                    words,
                }),
                Err(ReadFailure::Exception(code)) => return PollOutcome::Exception(code),
                // The reply may still arrive: never reuse this stream.
                Err(ReadFailure::Timeout) => {
                    self.context = None;
                    return PollOutcome::Timeout;
                }
                Err(ReadFailure::Transport(e)) => {
                    self.context = None;
                    return PollOutcome::Unreachable(format!(
                        "link to {} failed: {e}",
                        self.address
                    ));
                }
                Err(ReadFailure::Protocol(why)) => {
                    self.context = None;
                    return PollOutcome::Garbled(why);
                }
            }
        }
        match profile.decode(&results, meter.ratios) {
            Ok(values) => PollOutcome::Read(values),
            Err(e) => PollOutcome::Garbled(e.to_string()),
        }
    }
}

async fn read_registers(
    context: &mut Context,
    function: FunctionCode,
    address: u16,
    count: u16,
    limit: Duration,
) -> Result<Vec<u16>, ReadFailure> {
    let call = match function {
        FunctionCode::ReadHoldingRegisters => context.read_holding_registers(address, count),
        FunctionCode::ReadInputRegisters => context.read_input_registers(address, count),
    };
    match timeout(limit, call).await {
        Err(_) => Err(ReadFailure::Timeout),
        Ok(Err(tokio_modbus::Error::Transport(e))) => Err(ReadFailure::Transport(e)),
        Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(ReadFailure::Protocol(e.to_string())),
        Ok(Ok(Err(exception))) => Err(ReadFailure::Exception(u8::from(exception))),
        Ok(Ok(Ok(words))) => Ok(words),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use facwatch_proto::profile::{Profile, ProfileName, Ratios};
    use facwatch_proto::wire::{Quality, Values};
    use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);
    const REFUSING_UNIT: u8 = 3;

    fn values(power_kw: f32) -> Values {
        Values {
            power_kw: Some(power_kw),
            energy_kwh: Some(10.0),
            voltage_v: vec![230.0; 3],
            current_a: vec![20.0; 3],
            power_factor: Some(0.5),
        }
    }

    /// An SDM630 whose first answer comes too late (and shows 1 kW) and
    /// whose later answers come at once (and show 2 kW); unit 3 refuses
    /// every request.
    #[derive(Clone)]
    struct SlowThenFast {
        requests: Arc<AtomicUsize>,
    }

    impl tokio_modbus::server::Service for SlowThenFast {
        type Request = SlaveRequest<'static>;
        type Response = Response;
        type Exception = ExceptionCode;
        type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

        fn call(&self, request: Self::Request) -> Self::Future {
            let first = self.requests.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                let Request::ReadInputRegisters(address, count) = request.request else {
                    return Err(ExceptionCode::IllegalFunction);
                };
                if request.slave == REFUSING_UNIT {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                let power = if first {
                    tokio::time::sleep(TIMEOUT * 3).await;
                    1.0
                } else {
                    2.0
                };
                let image =
                    Profile::builtin(ProfileName::Sdm630).encode(&values(power), Ratios::default());
                let words = (address..address + count)
                    .map(|a| {
                        image
                            .iter()
                            .find(|(_, r, _)| *r == a)
                            .map_or(0, |(_, _, w)| *w)
                    })
                    .collect();
                Ok(Response::ReadInputRegisters(words))
            })
        }
    }

    /// Serves [`SlowThenFast`] on a free port; returns its address and the
    /// count of connections accepted.
    async fn serve() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let service = SlowThenFast {
            requests: Arc::new(AtomicUsize::new(0)),
        };
        let counter = Arc::clone(&connections);
        tokio::spawn(async move {
            let server = tokio_modbus::server::tcp::Server::new(listener);
            let on_connected = move |stream, socket_address| {
                counter.fetch_add(1, Ordering::SeqCst);
                let service = service.clone();
                async move {
                    tokio_modbus::server::tcp::accept_tcp_connection(stream, socket_address, |_| {
                        Ok(Some(service.clone()))
                    })
                }
            };
            let _ = server.serve(&on_connected, |_| {}).await;
        });
        (address, connections)
    }

    fn meter(address: SocketAddr, unit: u8) -> Meter {
        Meter {
            id: "m".into(),
            gateway: "gw".into(),
            profile: Profile::builtin(ProfileName::Sdm630),
            transport: facwatch_proto::site::Transport::Tcp(address),
            unit,
            ratios: Ratios::default(),
            read_limits: facwatch_proto::profile::ReadLimits::default(),
            timeout: TIMEOUT,
            retries: 0,
        }
    }

    #[tokio::test]
    async fn a_late_reply_never_answers_the_next_request() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (address, connections) = serve().await;
            let mut link = ModbusLink::new(address, TIMEOUT);
            let meter = meter(address, 1);
            assert_eq!(link.poll(&meter).await, PollOutcome::Timeout);
            // The 1 kW reply is still on its way; the next poll must read
            // the meter afresh (2 kW) on a new connection.
            match link.poll(&meter).await {
                PollOutcome::Read(read) => assert_eq!(read.power_kw, Some(2.0)),
                other => panic!("expected a reading, got {other:?}"),
            }
            assert_eq!(connections.load(Ordering::SeqCst), 2);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_exception_keeps_the_connection() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (address, connections) = serve().await;
            let mut link = ModbusLink::new(address, TIMEOUT);
            let meter = meter(address, REFUSING_UNIT);
            for _ in 0..3 {
                assert_eq!(link.poll(&meter).await.quality(), Quality::Exception(2));
            }
            assert_eq!(connections.load(Ordering::SeqCst), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_refused_connection_is_offline() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let address = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap()
            };
            let mut link = ModbusLink::new(address, TIMEOUT);
            let outcome = link.poll(&meter(address, 1)).await;
            assert_eq!(outcome.quality(), Quality::Offline);
            assert!(
                outcome.detail().contains(&address.to_string()),
                "{outcome:?}"
            );
        })
        .await
        .unwrap();
    }
}

//! Modbus TCP buses, served with tokio-modbus's server: one listener per
//! bus, one service per connection. tokio-modbus answers the requests of
//! one connection in order, so a delayed reply (`slow_reply`,
//! `late_reply`) also delays the requests behind it on that connection,
//! and a late reply is written whenever its delay ends if the connection
//! is still open, tagged with its own transaction id.

use std::future::{ready, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use facwatch_proto::profile::FunctionCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_modbus::server::tcp::Server;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::answer::{answer, Reply, Request};
use super::{Bus, MAX_CONNECTIONS_PER_ENDPOINT, RETRY_DELAY};

/// Serves `bus` on `listener` until `shutdown`, which closes its
/// connections.
pub(super) async fn serve(listener: TcpListener, bus: Arc<Bus>, shutdown: CancellationToken) {
    let local = listener.local_addr().ok();
    let server = Server::new(listener);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_ENDPOINT));
    let on_connected = |stream: TcpStream, peer: SocketAddr| {
        let connection = Arc::clone(&connections)
            .try_acquire_owned()
            .ok()
            .map(|permit| {
                // Requests are small; answer without Nagle's delay.
                let _ = stream.set_nodelay(true);
                debug!(?local, %peer, "Accepted a Modbus connection.");
                (
                    MeterService {
                        bus: Arc::clone(&bus),
                        _permit: permit,
                    },
                    stream,
                )
            });
        if connection.is_none() {
            warn!(?local, %peer, limit = MAX_CONNECTIONS_PER_ENDPOINT, "Too many connections; closing the new one.");
        }
        ready(Ok(connection))
    };
    let on_process_error =
        move |e: io::Error| debug!(?local, error = %e, "Modbus connection ended.");
    loop {
        // Dropping `serve` (on shutdown or error) closes its connections.
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = server.serve(&on_connected, on_process_error) => {
                if let Err(e) = result {
                    warn!(?local, error = %e, "Accepting a connection failed; retrying.");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY_DELAY) => {}
        }
    }
}

type TcpReply = Result<Option<Response>, ExceptionCode>;

/// One connection's service; holds its connection-limit permit.
struct MeterService {
    bus: Arc<Bus>,
    _permit: OwnedSemaphorePermit,
}

impl Service for MeterService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = TcpReply> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let bus = &self.bus;
        let Some(meter) = bus.units.get(&request.slave) else {
            debug!(bus = %bus.name, unit = request.slave, "No meter with this unit id; not answering.");
            return Box::pin(ready(Ok(None)));
        };
        let asked = match request.request {
            tokio_modbus::Request::ReadHoldingRegisters(address, count) => Request::Read {
                function: FunctionCode::ReadHoldingRegisters,
                address,
                count,
            },
            tokio_modbus::Request::ReadInputRegisters(address, count) => Request::Read {
                function: FunctionCode::ReadInputRegisters,
                address,
                count,
            },
            ref other => Request::Other {
                function: other.function_code().value(),
            },
        };
        let answer = answer(meter, &bus.plant, &bus.scenario, asked, bus.now.now_ms());
        let reply = match answer.reply {
            Reply::Silence => {
                debug!(meter = %meter.id, "Meter is silent (scenario fault); not answering.");
                Ok(None)
            }
            // Modbus TCP has no CRC: a frame that fails its check at the
            // device server never reaches the client.
            _ if answer.corrupt_crc => {
                debug!(meter = %meter.id, "Meter answers with a bad CRC (scenario fault); nothing reaches TCP.");
                Ok(None)
            }
            Reply::Words { function, words } => Ok(Some(match function {
                FunctionCode::ReadHoldingRegisters => Response::ReadHoldingRegisters(words),
                FunctionCode::ReadInputRegisters => Response::ReadInputRegisters(words),
            })),
            Reply::Exception(code) => Err(ExceptionCode::new(code)),
        };
        if answer.delay.is_zero() {
            Box::pin(ready(reply))
        } else {
            Box::pin(async move {
                tokio::time::sleep(answer.delay).await;
                reply
            })
        }
    }
}

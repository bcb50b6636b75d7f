//! Modbus TCP servers for the simulated meters.
//!
//! Meters are grouped by the `tcp` endpoint of the site file: one listener
//! per endpoint, the meters behind it told apart by unit id, as a serial
//! device server with several meters on its RS-485 bus would be.
//!
//! How a request is answered (`answer`), in this order:
//! 1. unit id of no meter on this endpoint: no reply (nobody on the bus
//!    answers), the connection stays open;
//! 2. `meter_silent` fault: no reply, the connection stays open;
//! 3. `modbus_exception` fault: that exception code;
//! 4. a function other than the profile's (FC03 for DTSU666, FC04 for
//!    SDM630): illegal function (01);
//! 5. a quantity outside 1..=125: illegal data value (03);
//! 6. any register outside the profile's read blocks: illegal data address
//!    (02);
//! 7. otherwise the words [`Profile::encode`] gives for the plant's values
//!    at the current virtual time (zero for registers of the block the
//!    profile does not model).
//!
//! Invariant: the virtual time used to answer never goes backwards within
//! one [`serve`], even if the wall clock does, so energy counters read
//! over the wire are monotone too.

use std::collections::BTreeMap;
use std::future::{ready, Ready};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::clock::Clock;
use facwatch_proto::profile::{FunctionCode, Profile, Ratios, ReadLimits, MAX_REGISTERS_PER_READ};
use facwatch_proto::site::{Site, Transport};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::plant::Plant;
use crate::scenario::{MeterFault, Scenario};

/// Connections one endpoint accepts at once, like the few TCP sessions of
/// a serial device server; further ones are closed on accept.
const MAX_CONNECTIONS_PER_ENDPOINT: usize = 16;
/// Pause before accepting again after an accept error (e.g. out of file
/// descriptors), so the error does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// One bound listener and the meters (by unit id) behind it.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
    configured: SocketAddr,
    local: SocketAddr,
    units: Vec<(u8, String)>,
}

impl Endpoint {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address the site file gives for this endpoint.
    pub fn configured_addr(&self) -> SocketAddr {
        self.configured
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(
        "endpoint {endpoint} serves meter `{meter}`, which the scenario's site does not define"
    )]
    UnknownMeter { endpoint: SocketAddr, meter: String },
    #[error("a meter server task failed: {0}")]
    Task(String),
}

/// Binds one listener per distinct meter endpoint of `site`, in order of
/// first appearance. With `ephemeral`, each binds `127.0.0.1:0` instead,
/// and the returned site has its meters' `tcp` rewritten to the bound
/// addresses (hand it to a gateway); otherwise it is `site` unchanged.
pub async fn bind(site: &Site, ephemeral: bool) -> io::Result<(Vec<Endpoint>, Site)> {
    let mut groups: Vec<(SocketAddr, Vec<(u8, String)>)> = Vec::new();
    for meter in &site.meters {
        let Transport::Tcp(tcp) = meter.transport else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "meter `{}` is on {}: the simulator serves Modbus TCP only",
                    meter.id,
                    meter.transport.bus()
                ),
            ));
        };
        let position = match groups.iter().position(|(addr, _)| *addr == tcp) {
            Some(position) => position,
            None => {
                groups.push((tcp, Vec::new()));
                groups.len() - 1
            }
        };
        let units = &mut groups[position].1;
        if let Some((_, other)) = units.iter().find(|(unit, _)| *unit == meter.unit) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "meters `{other}` and `{}` share endpoint {tcp} and unit {}",
                    meter.id, meter.unit
                ),
            ));
        }
        units.push((meter.unit, meter.id.clone()));
    }

    let mut endpoints = Vec::with_capacity(groups.len());
    let mut rewritten = site.clone();
    for (configured, units) in groups {
        let addr = if ephemeral {
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
        } else {
            configured
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr()?;
        for meter in rewritten
            .meters
            .iter_mut()
            .filter(|m| m.transport == Transport::Tcp(configured))
        {
            if ephemeral {
                meter.transport = Transport::Tcp(local);
            }
        }
        endpoints.push(Endpoint {
            listener,
            configured,
            local,
            units,
        });
    }
    Ok((endpoints, rewritten))
}

/// Serves the scenario's meters on `endpoints` until `shutdown`; open
/// connections are closed then. The meters behind each endpoint are looked
/// up by id in the scenario's site.
pub async fn serve(
    scenario: Arc<Scenario>,
    clock: Clock,
    endpoints: Vec<Endpoint>,
    shutdown: CancellationToken,
) -> Result<(), SimError> {
    let plant = Arc::new(Plant::new(&scenario));
    let now = Arc::new(MonotoneClock::new(clock));

    let mut servers = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let mut units = BTreeMap::new();
        for (unit, id) in &endpoint.units {
            let meter = scenario
                .site
                .meter(id)
                .ok_or_else(|| SimError::UnknownMeter {
                    endpoint: endpoint.local,
                    meter: id.clone(),
                })?;
            units.insert(
                *unit,
                ServedMeter {
                    id: meter.id.clone(),
                    profile: meter.profile.clone(),
                    ratios: meter.ratios,
                },
            );
        }
        let shared = Arc::new(Shared {
            units,
            plant: Arc::clone(&plant),
            scenario: Arc::clone(&scenario),
            now: Arc::clone(&now),
        });
        servers.push((endpoint, shared));
    }

    let mut tasks = JoinSet::new();
    for (endpoint, shared) in servers {
        info!(
            endpoint = %endpoint.local,
            configured = %endpoint.configured,
            units = ?endpoint.units,
            "Serving simulated meters."
        );
        tasks.spawn(serve_endpoint(endpoint.listener, shared, shutdown.clone()));
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            shutdown.cancel();
            return Err(SimError::Task(e.to_string()));
        }
    }
    Ok(())
}

async fn serve_endpoint(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
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
                        shared: Arc::clone(&shared),
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
            () = tokio::time::sleep(ACCEPT_RETRY_DELAY) => {}
        }
    }
}

/// Virtual time that never goes backwards within one [`serve`].
#[derive(Debug)]
struct MonotoneClock {
    clock: Clock,
    latest_ms: AtomicI64,
}

impl MonotoneClock {
    fn new(clock: Clock) -> MonotoneClock {
        MonotoneClock {
            clock,
            latest_ms: AtomicI64::new(i64::MIN),
        }
    }

    fn now_ms(&self) -> i64 {
        let now = self.clock.now_ms();
        self.latest_ms.fetch_max(now, Ordering::Relaxed).max(now)
    }
}

#[derive(Debug)]
struct ServedMeter {
    id: String,
    profile: Profile,
    ratios: Ratios,
}

/// What all connections of one endpoint share.
#[derive(Debug)]
struct Shared {
    units: BTreeMap<u8, ServedMeter>,
    plant: Arc<Plant>,
    scenario: Arc<Scenario>,
    now: Arc<MonotoneClock>,
}

/// One connection's service; holds its connection-limit permit.
struct MeterService {
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
}

impl Service for MeterService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let shared = &self.shared;
        let Some(meter) = shared.units.get(&request.slave) else {
            debug!(
                unit = request.slave,
                "No meter with this unit id; not answering."
            );
            return ready(Ok(None));
        };
        let at_ms = shared.now.now_ms();
        ready(answer(
            meter,
            &shared.plant,
            &shared.scenario,
            &request.request,
            at_ms,
        ))
    }
}

/// The reply of `meter` to `request` at virtual time `at_ms`: `Ok(None)`
/// for no reply at all.
fn answer(
    meter: &ServedMeter,
    plant: &Plant,
    scenario: &Scenario,
    request: &Request<'_>,
    at_ms: i64,
) -> Result<Option<Response>, ExceptionCode> {
    match scenario.meter_fault(&meter.id, at_ms) {
        Some(MeterFault::Silent) => {
            debug!(meter = %meter.id, "Meter is silent (scenario fault); not answering.");
            return Ok(None);
        }
        Some(MeterFault::Exception(code)) => {
            debug!(meter = %meter.id, code, "Meter answers an exception (scenario fault).");
            return Err(ExceptionCode::new(code));
        }
        None => {}
    }
    let (function, address, count) = match *request {
        Request::ReadHoldingRegisters(address, count) => {
            (FunctionCode::ReadHoldingRegisters, address, count)
        }
        Request::ReadInputRegisters(address, count) => {
            (FunctionCode::ReadInputRegisters, address, count)
        }
        _ => return Err(ExceptionCode::IllegalFunction),
    };
    if !meter.profile.fields.iter().any(|f| f.function == function) {
        return Err(ExceptionCode::IllegalFunction);
    }
    if count == 0 || count > MAX_REGISTERS_PER_READ {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let requested = u32::from(address)..u32::from(address) + u32::from(count);
    // A real meter answers the whole documented block around its
    // quantities, unused registers included: coalesce generously.
    let blocks = meter.profile.reads(ReadLimits {
        max_registers: MAX_REGISTERS_PER_READ,
        max_gap: MAX_REGISTERS_PER_READ,
    });
    let mapped = |register: u32| {
        blocks.iter().any(|read| {
            let start = u32::from(read.address);
            read.function == function && (start..start + u32::from(read.count)).contains(&register)
        })
    };
    if !requested.clone().all(mapped) {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    let values = plant
        .values(&meter.id, at_ms)
        .expect("served meters come from the scenario's site");
    let image: BTreeMap<u16, u16> = meter
        .profile
        .encode(&values, meter.ratios)
        .into_iter()
        .filter(|(f, _, _)| *f == function)
        .map(|(_, address, word)| (address, word))
        .collect();
    let words = requested
        .map(|register| image.get(&(register as u16)).copied().unwrap_or(0))
        .collect();
    Ok(Some(match function {
        FunctionCode::ReadHoldingRegisters => Response::ReadHoldingRegisters(words),
        FunctionCode::ReadInputRegisters => Response::ReadInputRegisters(words),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::{demo_ms, deploy_scenario};
    use facwatch_proto::profile::ProfileName;

    fn served(scenario: &Scenario, id: &str) -> ServedMeter {
        let meter = scenario.site.meter(id).unwrap();
        ServedMeter {
            id: id.into(),
            profile: meter.profile.clone(),
            ratios: meter.ratios,
        }
    }

    #[test]
    fn requests_get_the_answers_a_real_meter_gives() {
        let scenario = deploy_scenario();
        let plant = Plant::new(&scenario);
        let at = demo_ms("10:00:00");
        let stenter = served(&scenario, "l1-stenter");
        assert_eq!(stenter.profile.name, ProfileName::Dtsu666.as_str());
        let ask = |meter: &ServedMeter, request: Request<'static>| {
            answer(meter, &plant, &scenario, &request, at)
        };
        assert_eq!(
            ask(&stenter, Request::ReadInputRegisters(0x2000, 2)),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            ask(&stenter, Request::ReadCoils(0, 8)),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            ask(&stenter, Request::ReadHoldingRegisters(0x2000, 0)),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(
            ask(&stenter, Request::ReadHoldingRegisters(0x2000, 126)),
            Err(ExceptionCode::IllegalDataValue)
        );
        // The block 0x2000..0x202C is mapped; one register past it is not.
        assert_eq!(
            ask(&stenter, Request::ReadHoldingRegisters(0x2000, 0x2D)),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ask(&stenter, Request::ReadHoldingRegisters(0xFFFF, 2)),
            Err(ExceptionCode::IllegalDataAddress)
        );
        // Pt alone, as in DOMAIN.md's example frame `01 03 20 12 00 02`.
        let Ok(Some(Response::ReadHoldingRegisters(words))) =
            ask(&stenter, Request::ReadHoldingRegisters(0x2012, 2))
        else {
            panic!("no words");
        };
        let raw = f32::from_bits((u32::from(words[0]) << 16) | u32::from(words[1]));
        let expected = plant.values("l1-stenter", at).unwrap().power_kw.unwrap();
        // Secondary side: P = raw * PT * CT * 0.1 W.
        assert!((f64::from(raw) * 40.0 * 0.1 / 1000.0 - f64::from(expected)).abs() < 1e-3);

        let pump = served(&scenario, "l1-spray-pump");
        assert_eq!(
            ask(&pump, Request::ReadHoldingRegisters(0, 2)),
            Err(ExceptionCode::IllegalFunction)
        );
        assert!(matches!(
            ask(&pump, Request::ReadInputRegisters(0, 0x4A)),
            Ok(Some(Response::ReadInputRegisters(words))) if words.len() == 0x4A
        ));
    }

    #[test]
    fn scenario_faults_override_the_answer() {
        let scenario = deploy_scenario();
        let plant = Plant::new(&scenario);
        let fan = served(&scenario, "l2-main-fan");
        let read = Request::ReadHoldingRegisters(0x2000, 0x2C);
        assert_eq!(
            answer(&fan, &plant, &scenario, &read, demo_ms("16:10:00")),
            Ok(None)
        );
        let pump = served(&scenario, "l2-spray-pump");
        // Even a request it would refuse otherwise gets the fault's code.
        let wrong = Request::ReadHoldingRegisters(0, 2);
        assert_eq!(
            answer(&pump, &plant, &scenario, &wrong, demo_ms("18:01:00")),
            Err(ExceptionCode::ServerDeviceFailure)
        );
        assert_eq!(
            answer(&pump, &plant, &scenario, &wrong, demo_ms("18:05:00")),
            Err(ExceptionCode::IllegalFunction)
        );
    }

    #[test]
    fn served_virtual_time_never_goes_backwards() {
        let clock = MonotoneClock::new(Clock::simulated(1_000, 0, 1.0));
        let first = clock.now_ms();
        clock.latest_ms.store(first + 60_000, Ordering::Relaxed);
        assert_eq!(clock.now_ms(), first + 60_000);
    }

    #[tokio::test]
    async fn bind_groups_meters_by_endpoint_and_rewrites_ephemeral_addresses() {
        let scenario = deploy_scenario();
        let (endpoints, site) =
            tokio::time::timeout(Duration::from_secs(5), bind(&scenario.site, true))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(
            endpoints[0].configured_addr(),
            "127.0.0.1:15021".parse().unwrap()
        );
        assert_eq!(
            endpoints[0]
                .units
                .iter()
                .map(|(u, _)| *u)
                .collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_ne!(endpoints[0].local_addr().port(), 0);
        for meter in &site.meters {
            let original = scenario.site.meter(&meter.id).unwrap();
            let endpoint = endpoints
                .iter()
                .find(|e| original.transport == Transport::Tcp(e.configured_addr()))
                .unwrap();
            assert_eq!(meter.transport, Transport::Tcp(endpoint.local_addr()));
        }
    }
}

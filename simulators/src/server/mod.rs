//! The simulated meters as Modbus servers: one server per bus of the site
//! file, the meters on it told apart by unit id, as on a real RS-485 bus
//! behind a serial port or a serial device server.
//!
//! - `tcp` buses: Modbus TCP, with tokio-modbus's server
//!   ([`modbus_tcp`]).
//! - `rtu_over_tcp` buses: a TCP listener; each connection carries RTU
//!   frames ([`rtu`]), as a transparent serial device server does.
//! - `serial` buses: the port opened at the meter's line settings, RTU
//!   frames on it ([`serial`], [`rtu`]).
//!
//! What a meter answers is decided in one place, [`answer`], for every
//! transport. Where the transports differ: an unknown unit id gets no
//! reply on all of them; a `bad_crc` fault corrupts the CRC of an RTU
//! reply and suppresses a Modbus TCP reply (TCP frames carry no CRC).
//!
//! Invariant: the virtual time used to answer never goes backwards within
//! one [`serve`], even if the wall clock does, so energy counters read
//! over the wire are monotone too.

mod answer;
mod modbus_tcp;
mod rtu;
mod serial;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use facwatch_proto::clock::Clock;
use facwatch_proto::site::{SerialLine, Site, Transport};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::plant::Plant;
use crate::scenario::Scenario;
use answer::ServedMeter;

/// Connections one TCP endpoint accepts at once, like the few TCP sessions
/// of a serial device server; further ones are closed on accept.
const MAX_CONNECTIONS_PER_ENDPOINT: usize = 16;
/// Pause before accepting again after an accept error (e.g. out of file
/// descriptors), or before reopening a failed serial port, so the error
/// does not spin.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// One bus of the site file, bound or opened, and the meters on it.
#[derive(Debug)]
pub struct Endpoint {
    configured: Transport,
    served: Transport,
    link: Link,
    units: Vec<(u8, String)>,
}

#[derive(Debug)]
enum Link {
    ModbusTcp(TcpListener),
    RtuOverTcp(TcpListener),
    Serial(SerialStream, SerialLine),
}

impl Endpoint {
    /// The bus as the site file gives it.
    pub fn configured(&self) -> &Transport {
        &self.configured
    }

    /// Where the bus is served: the bound address for TCP and RTU over TCP
    /// (a port 0 or an ephemeral bind resolved), the port as configured
    /// for serial.
    pub fn served(&self) -> &Transport {
        &self.served
    }

    /// The meters on the bus as (unit id, meter id), in site-file order.
    pub fn units(&self) -> &[(u8, String)] {
        &self.units
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("bus {bus} serves meter `{meter}`, which the scenario's site does not define")]
    UnknownMeter { bus: String, meter: String },
    #[error("a meter server task failed: {0}")]
    Task(String),
}

/// Binds a listener for every TCP and RTU-over-TCP bus of `site` and opens
/// every serial port, in order of first appearance. With `ephemeral`, TCP
/// and RTU-over-TCP buses bind `127.0.0.1:0` instead of their address
/// (serial paths are used as given). The returned site has its meters'
/// addresses rewritten to where they are served (hand it to a gateway).
pub async fn bind(site: &Site, ephemeral: bool) -> io::Result<(Vec<Endpoint>, Site)> {
    let mut groups: Vec<(Transport, Vec<(u8, String)>)> = Vec::new();
    for meter in &site.meters {
        let bus = meter.transport.bus();
        let position = match groups.iter().position(|(t, _)| t.bus() == bus) {
            Some(position) => position,
            None => {
                groups.push((meter.transport.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        let (transport, units) = &mut groups[position];
        if *transport != meter.transport {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "meters `{}` and `{}` share {bus} with different line settings",
                    units[0].1, meter.id
                ),
            ));
        }
        if let Some((_, other)) = units.iter().find(|(unit, _)| *unit == meter.unit) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "meters `{other}` and `{}` share {bus} and unit {}",
                    meter.id, meter.unit
                ),
            ));
        }
        units.push((meter.unit, meter.id.clone()));
    }

    let mut endpoints = Vec::with_capacity(groups.len());
    let mut rewritten = site.clone();
    for (configured, units) in groups {
        let (link, served) = match &configured {
            Transport::Tcp(address) => {
                let (listener, local) = listen(*address, ephemeral).await?;
                (Link::ModbusTcp(listener), Transport::Tcp(local))
            }
            Transport::RtuOverTcp { address, baud } => {
                let (listener, local) = listen(*address, ephemeral).await?;
                (
                    Link::RtuOverTcp(listener),
                    Transport::RtuOverTcp {
                        address: local,
                        baud: *baud,
                    },
                )
            }
            Transport::Serial(line) => (
                Link::Serial(serial::open(line)?, line.clone()),
                configured.clone(),
            ),
        };
        for meter in rewritten
            .meters
            .iter_mut()
            .filter(|m| m.transport == configured)
        {
            meter.transport = served.clone();
        }
        endpoints.push(Endpoint {
            configured,
            served,
            link,
            units,
        });
    }
    Ok((endpoints, rewritten))
}

async fn listen(address: SocketAddr, ephemeral: bool) -> io::Result<(TcpListener, SocketAddr)> {
    let address = if ephemeral {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    } else {
        address
    };
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves the scenario's meters on `endpoints` until `shutdown`; open
/// connections are closed then. The meters of each endpoint are looked up
/// by id in the scenario's site.
pub async fn serve(
    scenario: Arc<Scenario>,
    clock: Clock,
    endpoints: Vec<Endpoint>,
    shutdown: CancellationToken,
) -> Result<(), SimError> {
    let plant = Arc::new(Plant::new(&scenario));
    let now = Arc::new(MonotoneClock::new(clock));

    let mut buses = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let name = endpoint.served.bus();
        let mut units = BTreeMap::new();
        for (unit, id) in &endpoint.units {
            let meter = scenario
                .site
                .meter(id)
                .ok_or_else(|| SimError::UnknownMeter {
                    bus: name.clone(),
                    meter: id.clone(),
                })?;
            units.insert(*unit, ServedMeter::new(meter));
        }
        let bus = Arc::new(Bus {
            name,
            units,
            plant: Arc::clone(&plant),
            scenario: Arc::clone(&scenario),
            now: Arc::clone(&now),
            silence: endpoint.served.inter_frame_silence(),
        });
        buses.push((endpoint, bus));
    }

    let mut tasks = JoinSet::new();
    for (endpoint, bus) in buses {
        info!(
            bus = %endpoint.served.bus(),
            configured = %endpoint.configured.bus(),
            units = ?endpoint.units,
            "Serving simulated meters."
        );
        let shutdown = shutdown.clone();
        match endpoint.link {
            Link::ModbusTcp(listener) => {
                tasks.spawn(modbus_tcp::serve(listener, bus, shutdown));
            }
            Link::RtuOverTcp(listener) => {
                tasks.spawn(rtu::serve_listener(listener, bus, shutdown));
            }
            Link::Serial(port, line) => {
                tasks.spawn(serial::serve(port, line, bus, shutdown));
            }
        }
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            shutdown.cancel();
            return Err(SimError::Task(e.to_string()));
        }
    }
    Ok(())
}

/// One served bus: what all its connections share.
#[derive(Debug)]
struct Bus {
    /// Where it is served, for logs.
    name: String,
    units: BTreeMap<u8, ServedMeter>,
    plant: Arc<Plant>,
    scenario: Arc<Scenario>,
    now: Arc<MonotoneClock>,
    /// RTU inter-frame silence (zero for Modbus TCP).
    silence: Duration,
}

#[cfg(test)]
impl Bus {
    /// Line 1 of `scenario`'s site (the `l1-` meters) as one bus at 9600
    /// baud, its clock at `at_ms` now, running at real speed.
    fn line1(scenario: Scenario, at_ms: i64) -> Bus {
        let units = scenario
            .site
            .meters
            .iter()
            .filter(|m| m.id.starts_with("l1-"))
            .map(|m| (m.unit, ServedMeter::new(m)))
            .collect();
        let clock = Clock::simulated(at_ms, facwatch_proto::clock::wall_now_ms(), 1.0);
        Bus {
            name: "line1".into(),
            units,
            plant: Arc::new(Plant::new(&scenario)),
            scenario: Arc::new(scenario),
            now: Arc::new(MonotoneClock::new(clock)),
            silence: Duration::from_micros(4010),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::deploy_scenario;

    #[test]
    fn served_virtual_time_never_goes_backwards() {
        let clock = MonotoneClock::new(Clock::simulated(1_000, 0, 1.0));
        let first = clock.now_ms();
        clock.latest_ms.store(first + 60_000, Ordering::Relaxed);
        assert_eq!(clock.now_ms(), first + 60_000);
    }

    #[tokio::test]
    async fn bind_groups_meters_by_bus_and_rewrites_ephemeral_addresses() {
        let scenario = deploy_scenario();
        let (endpoints, site) =
            tokio::time::timeout(Duration::from_secs(5), bind(&scenario.site, true))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(
            endpoints[0].configured(),
            &Transport::Tcp("127.0.0.1:15021".parse().unwrap())
        );
        assert_eq!(
            endpoints[0]
                .units()
                .iter()
                .map(|(u, _)| *u)
                .collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        let Transport::Tcp(served) = endpoints[0].served() else {
            panic!("not TCP");
        };
        assert_ne!(served.port(), 0);
        for meter in &site.meters {
            let original = scenario.site.meter(&meter.id).unwrap();
            let endpoint = endpoints
                .iter()
                .find(|e| original.transport == *e.configured())
                .unwrap();
            assert_eq!(&meter.transport, endpoint.served());
        }
    }
}

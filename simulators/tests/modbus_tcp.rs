//! The simulated meters over real Modbus TCP, read with tokio-modbus's
//! client and decoded with the proto profiles, as the gateway will.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use facwatch_proto::clock::{wall_now_ms, Clock};
use facwatch_proto::site::Site;
use facwatch_proto::wire::Values;
use facwatch_sim::{bind, serve, Plant, Scenario, SimError};
use tokio::task::JoinHandle;
use tokio_modbus::client::{tcp, Context, Reader};
use tokio_modbus::prelude::{ExceptionCode, Slave, SlaveContext};
use tokio_util::sync::CancellationToken;

const SITE: &str = include_str!("../../deploy/stenter-plant.site.toml");
const SCENARIO: &str = include_str!("../../deploy/stenter-plant.scenario.toml");
const TEST_LIMIT: Duration = Duration::from_secs(20);
/// How long a read may take before the meter counts as silent.
const NO_REPLY: Duration = Duration::from_millis(300);

fn demo_ms(hh_mm_ss: &str) -> i64 {
    DateTime::parse_from_rfc3339(&format!("2022-12-13T{hh_mm_ss}+08:00"))
        .unwrap()
        .timestamp_millis()
}

fn scenario() -> Scenario {
    let site = Site::from_toml(SITE, "stenter-plant.site.toml").unwrap();
    Scenario::from_toml(SCENARIO, "stenter-plant.scenario.toml", site).unwrap()
}

struct Running {
    /// The site with meter addresses rewritten to the bound ports.
    site: Site,
    plant: Plant,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SimError>>,
}

/// Serves the demo scenario on ephemeral ports, its clock at `at` (local
/// time on the demo day) now and running at real speed.
async fn start_at(at: &str) -> Running {
    let scenario = scenario();
    let plant = Plant::new(&scenario);
    let (endpoints, site) = bind(&scenario.site, true).await.unwrap();
    let clock = Clock::simulated(demo_ms(at), wall_now_ms(), 1.0);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(
        Arc::new(scenario),
        clock,
        endpoints,
        shutdown.clone(),
    ));
    Running {
        site,
        plant,
        shutdown,
        task,
    }
}

fn tcp_address(meter: &facwatch_proto::site::Meter) -> std::net::SocketAddr {
    match meter.transport {
        facwatch_proto::site::Transport::Tcp(address) => address,
        ref other => panic!("{} is not on Modbus TCP: {other:?}", meter.id),
    }
}

impl Running {
    async fn connect(&self, meter: &str) -> Context {
        let meter = self.site.meter(meter).unwrap();
        tcp::connect_slave(tcp_address(meter), Slave(meter.unit))
            .await
            .unwrap()
    }

    /// One poll of `meter` as the gateway makes it: every read of its
    /// profile, decoded with its ratios.
    async fn poll(&self, ctx: &mut Context, meter: &str) -> Values {
        common::poll(ctx, self.site.meter(meter).unwrap()).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("test took too long")
}

fn assert_power_near(values: &Values, level_kw: f64) {
    let p = f64::from(values.power_kw.unwrap());
    // 3 % noise, plus the f32 rounding of the registers.
    assert!(
        (p - level_kw).abs() <= level_kw * 0.03 + 1e-3,
        "{p} kW, expected {level_kw} kW +- 3 %"
    );
}

#[tokio::test]
async fn dtsu666_and_sdm630_meters_read_the_plant_over_modbus_tcp() {
    bounded(async {
        let sim = start_at("10:00:00").await;

        // DTSU666, FC03, secondary side with CT 40: the stenter producing.
        let mut stenter = sim.connect("l1-stenter").await;
        let values = sim.poll(&mut stenter, "l1-stenter").await;
        assert_power_near(&values, 150.0 * 0.75);
        let pf = values.power_factor.unwrap();
        assert!((0.799..=0.881).contains(&pf), "{pf}");
        for (u, i) in values.voltage_v.iter().zip(&values.current_a) {
            assert!((215.0..=235.0).contains(u), "{u}");
            let expected = values.power_kw.unwrap() * 1000.0 / (3.0 * u * pf);
            assert!((i - expected).abs() <= expected * 1e-3, "{i} {expected}");
        }
        // The energy counter is the plant's, within the virtual seconds the
        // test has taken (at most 20 s at 112.5 kW is 0.63 kWh).
        let energy = values.energy_kwh.unwrap();
        let expected = sim
            .plant
            .values("l1-stenter", demo_ms("10:00:00"))
            .unwrap()
            .energy_kwh
            .unwrap();
        assert!(
            energy >= expected - 0.01 && energy < expected + 0.7,
            "{energy} {expected}"
        );

        // SDM630, FC04, engineering units, on the same device server.
        let mut condenser = sim.connect("l1-condenser").await;
        assert_power_near(&sim.poll(&mut condenser, "l1-condenser").await, 7.5 * 0.85);
        // Line 2's endpoint is another server.
        let mut fan = sim.connect("l2-main-fan").await;
        assert_power_near(&sim.poll(&mut fan, "l2-main-fan").await, 22.0 * 0.8);

        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wrong_function_and_unmapped_registers_get_real_meter_exceptions() {
    bounded(async {
        let sim = start_at("10:00:00").await;
        let mut stenter = sim.connect("l1-stenter").await;
        assert_eq!(
            stenter.read_input_registers(0x2012, 2).await.unwrap(),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            stenter.read_holding_registers(0x3000, 2).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        let mut pump = sim.connect("l1-spray-pump").await;
        assert_eq!(
            pump.read_holding_registers(0x34, 2).await.unwrap(),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            pump.read_input_registers(0x48, 4).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        // The connection stays usable after exceptions.
        assert_eq!(
            pump.read_input_registers(0x34, 2)
                .await
                .unwrap()
                .unwrap()
                .len(),
            2
        );
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_unit_id_gets_no_reply_like_an_empty_bus_address() {
    bounded(async {
        let sim = start_at("10:00:00").await;
        let mut ctx = sim.connect("l1-stenter").await;
        ctx.set_slave(Slave(9));
        let read = tokio::time::timeout(NO_REPLY, ctx.read_holding_registers(0x2012, 2)).await;
        assert!(read.is_err(), "unit 9 answered: {read:?}");
        // The connection is still open: unit 1 on the same bus answers.
        ctx.set_slave(Slave(1));
        assert_eq!(
            ctx.read_holding_registers(0x2012, 2)
                .await
                .unwrap()
                .unwrap()
                .len(),
            2
        );
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn silent_meter_times_out_but_keeps_the_connection_open() {
    bounded(async {
        // The scenario silences l2-main-fan from 16:00 to 16:20.
        let sim = start_at("16:05:00").await;
        let mut ctx = sim.connect("l2-main-fan").await;
        let read = tokio::time::timeout(NO_REPLY, ctx.read_holding_registers(0x2012, 2)).await;
        assert!(read.is_err(), "the silent meter answered: {read:?}");
        // Another meter on the same bus and connection still answers.
        let stenter = sim.site.meter("l2-stenter").unwrap();
        ctx.set_slave(Slave(stenter.unit));
        let values = sim.poll(&mut ctx, "l2-stenter").await;
        assert_power_near(&values, 150.0 * 0.75);
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn modbus_exception_fault_answers_its_code() {
    bounded(async {
        // The scenario makes l2-spray-pump answer code 4 from 18:00 to 18:05.
        let sim = start_at("18:01:00").await;
        let mut ctx = sim.connect("l2-spray-pump").await;
        assert_eq!(
            ctx.read_input_registers(0, 0x4A).await.unwrap(),
            Err(ExceptionCode::ServerDeviceFailure)
        );
        // Its neighbour on the bus is fine.
        let mut condenser = sim.connect("l2-condenser").await;
        assert_power_near(&sim.poll(&mut condenser, "l2-condenser").await, 7.5 * 0.85);
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_serving_and_closes_connections() {
    bounded(async {
        let sim = start_at("10:00:00").await;
        let addr = tcp_address(sim.site.meter("l1-stenter").unwrap());
        let mut ctx = sim.connect("l1-stenter").await;
        assert!(ctx.read_holding_registers(0x2012, 2).await.unwrap().is_ok());
        sim.stop().await;
        // The open connection is closed and the port no longer listens.
        assert!(ctx.read_holding_registers(0x2012, 2).await.is_err());
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    })
    .await;
}

//! Every built-in profile and a generic one, served over each transport
//! (Modbus TCP, RTU over TCP, RTU on a serial port), read back with
//! tokio-modbus's clients and decoded with the proto profiles: the values
//! are the plant's.

mod common;

use common::{bounded, poll, start, Pty, TestMeter, PROFILES, RTU_OVER_TCP, TCP};
use tokio_modbus::client::rtu;
use tokio_modbus::prelude::{Slave, SlaveContext};

/// One meter of each profile on one bus with `transport`, units 1..=7.
fn one_of_each(prefix: &str, transport: &str) -> Vec<TestMeter> {
    PROFILES
        .iter()
        .zip(1..)
        .map(|(profile, unit)| {
            TestMeter::new(&format!("{prefix}-{profile}"), profile, transport, unit)
        })
        .collect()
}

#[tokio::test]
async fn every_profile_reads_the_plant_over_modbus_tcp() {
    bounded(async {
        let sim = start(&one_of_each("tcp", TCP), "").await;
        for profile in PROFILES {
            let id = format!("tcp-{profile}");
            let mut ctx = sim.connect(&id).await;
            let from = sim.clock.now_ms();
            let values = poll(&mut ctx, sim.meter(&id)).await;
            sim.assert_read_from_plant(&id, &values, from, sim.clock.now_ms());
        }
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn every_profile_reads_the_plant_over_rtu_over_tcp() {
    bounded(async {
        let sim = start(&one_of_each("rot", RTU_OVER_TCP), "").await;
        for profile in PROFILES {
            let id = format!("rot-{profile}");
            let mut ctx = sim.connect(&id).await;
            let from = sim.clock.now_ms();
            let values = poll(&mut ctx, sim.meter(&id)).await;
            sim.assert_read_from_plant(&id, &values, from, sim.clock.now_ms());
        }
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn every_profile_reads_the_plant_over_a_serial_bus() {
    bounded(async {
        let pty = Pty::open();
        let sim = start(&one_of_each("ser", &pty.transport()), "").await;
        // One client on the bus, addressing each unit in turn, as the
        // gateway's poller of one RS-485 line does.
        let mut ctx = rtu::attach_slave(pty.master, Slave(1));
        for profile in PROFILES {
            let id = format!("ser-{profile}");
            let meter = sim.meter(&id);
            ctx.set_slave(Slave(meter.unit));
            let from = sim.clock.now_ms();
            let values = poll(&mut ctx, meter).await;
            sim.assert_read_from_plant(&id, &values, from, sim.clock.now_ms());
        }
        sim.stop().await;
    })
    .await;
}

#[tokio::test]
async fn one_simulator_serves_all_transports_at_once() {
    bounded(async {
        let pty = Pty::open();
        let mut meters = vec![
            TestMeter::new("tcp-a", "dtsu666", TCP, 1),
            TestMeter::new("rot-a", "sdm630", RTU_OVER_TCP, 1),
            TestMeter::new("ser-a", "adl400", &pty.transport(), 1),
        ];
        meters.push(TestMeter::new("rot-b", "adw300", RTU_OVER_TCP, 2));
        let sim = start(&meters, "").await;
        for id in ["tcp-a", "rot-a", "rot-b"] {
            let mut ctx = sim.connect(id).await;
            let from = sim.clock.now_ms();
            let values = poll(&mut ctx, sim.meter(id)).await;
            sim.assert_read_from_plant(id, &values, from, sim.clock.now_ms());
        }
        let mut ctx = rtu::attach_slave(pty.master, Slave(1));
        let from = sim.clock.now_ms();
        let values = poll(&mut ctx, sim.meter("ser-a")).await;
        sim.assert_read_from_plant("ser-a", &values, from, sim.clock.now_ms());
        sim.stop().await;
    })
    .await;
}

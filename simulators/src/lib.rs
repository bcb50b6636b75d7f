//! facwatch simulators: the power meters of a plant, driven by a scenario,
//! served over every transport of the site file (Modbus TCP, Modbus RTU
//! over TCP, Modbus RTU on a serial port) on the shared virtual clock
//! ([`facwatch_proto::clock::Clock`]), so the gateway and the ingest can be
//! run and tested without hardware.
//!
//! - [`scenario`]: the scenario file (shifts, faults, load overrides) and
//!   the site file it names, validated together.
//! - [`plant`]: the pure model. Production facilities run inside their
//!   line's shift windows; treatment runs from `lead` minutes before
//!   production to `lag` minutes after; `facility_off` faults force the off
//!   level, `treatment_late` / `treatment_early` shift treatment's start or
//!   stop past production's, `low_load` lowers the running draw,
//!   `frozen_value` and `energy_backwards` falsify a meter's readings (the
//!   rule scenarios in `deploy/scenarios/` use them, one per rule). Each meter's reading (power with seeded noise, power factor,
//!   phase voltages, currents, energy) is a function of (seed, meter,
//!   virtual time) alone, equal within a virtual second; energy counters
//!   integrate the noiseless schedule and never go backwards.
//! - [`server`]: one server per bus of the site file, meters told apart
//!   by unit id. Each meter answers at its profile's real addresses and
//!   function code with [`facwatch_proto::profile::Profile::encode`] of
//!   its values (so the gateway's decoding and the simulator's encoding
//!   share one table), refuses what a real meter refuses with the same
//!   exception, ignores unknown unit ids and RTU frames with a bad CRC, and
//!   plays the scenario's meter faults (`meter_silent`, `modbus_exception`,
//!   `slow_reply`, `late_reply`, `bad_crc`).
//!
//! Usage: [`Scenario::load`], then [`bind`] (ephemeral for tests: the
//! returned site points at the bound ports), then
//! [`serve`]`(scenario, clock, endpoints, shutdown)`.

pub mod plant;
pub mod scenario;
pub mod server;

pub use plant::Plant;
pub use scenario::Scenario;
pub use server::{bind, serve, Endpoint, SimError};

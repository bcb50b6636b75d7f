//! The facwatch demo and the end-to-end harness: a simulated plant, the
//! gateway and the ingest wired together in one process ([`pipeline`]),
//! the text the demo prints ([`report`]), and a plant's samples without the
//! wires, for detector tests ([`plant_samples`]).

pub mod pipeline;
pub mod pki;
pub mod plant_samples;
pub mod report;

/// The built-in scenario: `deploy/stenter-plant.scenario.toml` and the site
/// file it names, compiled into the binary so `cargo run` needs no files.
pub fn builtin_scenario() -> Result<facwatch_sim::Scenario, facwatch_proto::site::ConfigError> {
    let site = facwatch_proto::site::Site::from_toml(
        include_str!("../deploy/stenter-plant.site.toml"),
        "deploy/stenter-plant.site.toml",
    )?;
    facwatch_sim::Scenario::from_toml(
        include_str!("../deploy/stenter-plant.scenario.toml"),
        "deploy/stenter-plant.scenario.toml",
        site,
    )
}

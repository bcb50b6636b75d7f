//! The site file: one TOML file per site (permit holder), read by the gateway
//! (its meters), the ingest (lines, facilities, rule settings) and the
//! simulator (all of it).
//!
//! Two stages, as everywhere in facwatch: `raw` serde structs that refuse
//! unknown keys, then [`Site`], built only by [`Site::from_toml`] after every
//! cross-reference is checked. Invariants of a [`Site`]:
//! - ids (site, gateways, meters, lines, facilities) match [`validate_id`]
//!   and are unique in their kind;
//! - every facility's meter exists, and every meter belongs to a known
//!   gateway; all facilities of one line are read by one gateway;
//! - each line has at least one production and one treatment facility;
//! - thresholds satisfy `0 <= stop <= start`, durations are positive.
//!
//! Every error names the file, the key (as a dotted path) and the problem.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

mod meter;
mod rules;

pub use meter::{Meter, SerialLine, Transport};
pub use rules::{
    FacilityRules, Maintenance, R1Settings, R2Settings, R3Settings, R4Settings, R5Settings,
    R7Settings, Restriction, Rules,
};

/// A configuration file that could not be used. Displays as
/// `FILE: KEY: PROBLEM` (or `FILE: PROBLEM` when no key applies).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub key: Option<String>,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: {}: {}", self.file, key, self.problem),
            None => write!(f, "{}: {}", self.file, self.problem),
        }
    }
}

impl ConfigError {
    pub fn new(file: &str, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            key: Some(key.into()),
            problem: problem.into(),
        }
    }
}

/// Reads a TOML file into a raw serde struct, with errors naming the file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, String), ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        key: None,
        problem: format!("cannot read: {e}"),
    })?;
    parse_toml(&text, &file).map(|v| (v, file))
}

/// Parses TOML text into a raw serde struct; `file` names it in errors,
/// with the key path (e.g. `lines[0].facilities[2].rated_kw`) and the line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let mut problem = inner.message().trim_end().to_string();
        if let Some(span) = inner.span() {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            problem = format!("{problem} (line {line})");
        }
        ConfigError {
            file: file.to_string(),
            key: (path != ".").then_some(path),
            problem,
        }
    })
}

/// Ids become MQTT topic levels and store keys: 1-64 characters of ASCII
/// letters, digits, `-` and `_`.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("id `{id}` must be 1 to 64 characters long"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "id `{id}` contains `{c}`; use ASCII letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

/// What a facility is. The role (production or treatment) follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FacilityKind {
    Stenter,
    Boiler,
    /// Any other production machine.
    Production,
    MainFan,
    Condenser,
    HvEsp,
    SprayPump,
    /// Any other treatment equipment.
    Treatment,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Production,
    Treatment,
}

impl FacilityKind {
    pub fn role(self) -> Role {
        match self {
            FacilityKind::Stenter | FacilityKind::Boiler | FacilityKind::Production => {
                Role::Production
            }
            _ => Role::Treatment,
        }
    }

    /// Plural English noun used in notices ("condensers, fans, ...").
    pub fn noun_en(self) -> &'static str {
        match self {
            FacilityKind::Stenter => "stenters",
            FacilityKind::Boiler => "boilers",
            FacilityKind::Production => "production equipment",
            FacilityKind::MainFan => "fans",
            FacilityKind::Condenser => "condensers",
            FacilityKind::HvEsp => "high-voltage electrostatic",
            FacilityKind::SprayPump => "spray pumps",
            FacilityKind::Treatment => "treatment equipment",
        }
    }

    /// Chinese noun used in notices.
    pub fn noun_zh(self) -> &'static str {
        match self {
            FacilityKind::Stenter => "定型机",
            FacilityKind::Boiler => "锅炉",
            FacilityKind::Production => "生产设施",
            FacilityKind::MainFan => "风机",
            FacilityKind::Condenser => "冷凝器",
            FacilityKind::HvEsp => "高压静电",
            FacilityKind::SprayPump => "喷淋泵",
            FacilityKind::Treatment => "治理设施",
        }
    }
}

/// A validated site file.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub time_zone: chrono_tz::Tz,
    pub gateways: Vec<Gateway>,
    pub meters: Vec<Meter>,
    pub lines: Vec<Line>,
    /// Site-level rule settings; each line has its own resolved copy.
    pub rules: Rules,
    /// Declared restriction windows (R6), in file order.
    pub restrictions: Vec<Restriction>,
    /// Declared maintenance windows, in file order.
    pub maintenance: Vec<Maintenance>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub id: String,
    pub poll_interval: Duration,
    /// Wall-clock limit on every Modbus call.
    pub modbus_timeout: Duration,
    /// Virtual-time span of samples collected into one batch.
    pub batch_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub id: String,
    pub name: String,
    pub facilities: Vec<Facility>,
    /// The site's rule settings with this line's overrides.
    pub rules: Rules,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Facility {
    pub id: String,
    pub name: String,
    pub kind: FacilityKind,
    pub meter: String,
    pub rated_kw: f64,
    /// Running at or above this power.
    pub start_threshold_kw: f64,
    /// Stopped below this power; between the two the state holds.
    pub stop_threshold_kw: f64,
    /// For treatment: whether its stop alone makes an R1 violation.
    pub critical: bool,
    /// Rule settings about this facility (R4 fractions, R7 duration).
    pub rules: FacilityRules,
}

impl Facility {
    pub fn role(&self) -> Role {
        self.kind.role()
    }
}

impl Site {
    pub fn gateway(&self, id: &str) -> Option<&Gateway> {
        self.gateways.iter().find(|g| g.id == id)
    }

    pub fn meter(&self, id: &str) -> Option<&Meter> {
        self.meters.iter().find(|m| m.id == id)
    }

    /// The gateway that reads a line (all its meters share one).
    pub fn gateway_of_line(&self, line: &Line) -> &str {
        let meter = &line.facilities[0].meter;
        &self
            .meter(meter)
            .expect("validated site: meter exists")
            .gateway
    }

    /// Loads and validates a site file.
    pub fn load(path: &Path) -> Result<Site, ConfigError> {
        let (raw, file) = read_toml::<raw::SiteFile>(path)?;
        Site::validate(raw, &file)
    }

    /// Parses and validates site-file text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Site, ConfigError> {
        Site::validate(parse_toml(text, file)?, file)
    }

    fn validate(raw: raw::SiteFile, file: &str) -> Result<Site, ConfigError> {
        let err = |key: String, problem: String| ConfigError::new(file, key, problem);
        validate_id(&raw.site.id).map_err(|p| err("site.id".into(), p))?;
        let time_zone: chrono_tz::Tz = raw.site.time_zone.parse().map_err(|_| {
            err(
                "site.time_zone".into(),
                format!(
                    "unknown time zone `{}` (e.g. Asia/Shanghai)",
                    raw.site.time_zone
                ),
            )
        })?;

        let mut ids = HashSet::new();
        let mut gateways = Vec::new();
        for (i, g) in raw.gateways.iter().enumerate() {
            let key = |k: &str| format!("gateways[{i}].{k}");
            validate_id(&g.id).map_err(|p| err(key("id"), p))?;
            if !ids.insert(g.id.clone()) {
                return Err(err(key("id"), format!("duplicate gateway id `{}`", g.id)));
            }
            gateways.push(Gateway {
                id: g.id.clone(),
                poll_interval: positive_secs(
                    g.poll_interval_secs,
                    &key("poll_interval_secs"),
                    file,
                )?,
                modbus_timeout: Duration::from_millis(positive(
                    g.modbus_timeout_ms,
                    &key("modbus_timeout_ms"),
                    file,
                )?),
                batch_interval: positive_secs(
                    g.batch_interval_secs,
                    &key("batch_interval_secs"),
                    file,
                )?,
            });
        }
        if gateways.is_empty() {
            return Err(ConfigError::new(
                file,
                "gateways",
                "at least one [[gateways]] is required",
            ));
        }

        let mut meters = Vec::new();
        let mut ids = HashSet::new();
        for (i, m) in raw.meters.iter().enumerate() {
            let key = |k: &str| format!("meters[{i}].{k}");
            let id = meter::meter_id(m);
            validate_id(id).map_err(|p| err(key("id"), p))?;
            if !ids.insert(id.to_string()) {
                return Err(err(key("id"), format!("duplicate meter id `{id}`")));
            }
            if !gateways.iter().any(|g| g.id == meter::meter_gateway(m)) {
                return Err(err(
                    key("gateway"),
                    format!(
                        "gateway `{}` is not defined in [[gateways]]",
                        meter::meter_gateway(m)
                    ),
                ));
            }
            let gateway = gateways
                .iter()
                .find(|g| g.id == meter::meter_gateway(m))
                .expect("checked above");
            let meter = meter::validate(m, gateway.modbus_timeout, file, &key)?;
            if let Some(other) = meters.iter().find(|o: &&Meter| {
                o.transport.bus() == meter.transport.bus() && o.unit == meter.unit
            }) {
                return Err(err(
                    key("unit"),
                    format!(
                        "unit {} on {} is already meter `{}`; one bus cannot tell them apart",
                        meter.unit,
                        meter.transport.bus(),
                        other.id
                    ),
                ));
            }
            if let Some(other) = meters.iter().find(|o: &&Meter| {
                o.transport.bus() == meter.transport.bus() && o.transport != meter.transport
            }) {
                return Err(err(
                    key("baud"),
                    format!(
                        "line settings differ from meter `{}` on the same bus {}",
                        other.id,
                        meter.transport.bus()
                    ),
                ));
            }
            meters.push(meter);
        }

        let site_rules = Rules::defaults().overridden(&raw.rules, "rules", file)?;
        let mut lines = Vec::new();
        let mut line_ids = HashSet::new();
        let mut facility_ids = HashSet::new();
        let mut metered = HashSet::new();
        for (i, l) in raw.lines.iter().enumerate() {
            let key = |k: &str| format!("lines[{i}].{k}");
            validate_id(&l.id).map_err(|p| err(key("id"), p))?;
            if !line_ids.insert(l.id.clone()) {
                return Err(err(key("id"), format!("duplicate line id `{}`", l.id)));
            }
            let line_rules = match &l.rules {
                Some(r) => site_rules.overridden(r, &key("rules"), file)?,
                None => site_rules.clone(),
            };
            let mut facilities = Vec::new();
            let mut line_gateway: Option<&str> = None;
            for (j, f) in l.facilities.iter().enumerate() {
                let key = |k: &str| format!("lines[{i}].facilities[{j}].{k}");
                validate_id(&f.id).map_err(|p| err(key("id"), p))?;
                if !facility_ids.insert(f.id.clone()) {
                    return Err(err(key("id"), format!("duplicate facility id `{}`", f.id)));
                }
                let meter = meters.iter().find(|m| m.id == f.meter).ok_or_else(|| {
                    err(
                        key("meter"),
                        format!("meter `{}` is not defined in [[meters]]", f.meter),
                    )
                })?;
                if !metered.insert(f.meter.clone()) {
                    return Err(err(
                        key("meter"),
                        format!("meter `{}` already measures another facility", f.meter),
                    ));
                }
                match line_gateway {
                    None => line_gateway = Some(&meter.gateway),
                    Some(g) if g != meter.gateway => {
                        return Err(err(
                            key("meter"),
                            format!(
                                "meter `{}` is read by gateway `{}`, but this line's other meters by `{g}`; one line needs one gateway",
                                f.meter, meter.gateway
                            ),
                        ))
                    }
                    Some(_) => {}
                }
                let start = f.start_threshold_kw;
                let stop = f.stop_threshold_kw.unwrap_or(0.8 * start);
                if !(start.is_finite() && start > 0.0) {
                    return Err(err(
                        key("start_threshold_kw"),
                        format!("{start} must be a positive number"),
                    ));
                }
                if !(stop.is_finite() && stop >= 0.0 && stop <= start) {
                    return Err(err(
                        key("stop_threshold_kw"),
                        format!("{stop} must be between 0 and start_threshold_kw ({start})"),
                    ));
                }
                if !(f.rated_kw.is_finite() && f.rated_kw > 0.0) {
                    return Err(err(
                        key("rated_kw"),
                        format!("{} must be a positive number", f.rated_kw),
                    ));
                }
                facilities.push(Facility {
                    id: f.id.clone(),
                    name: f.name.clone().unwrap_or_else(|| f.id.clone()),
                    kind: f.kind,
                    meter: f.meter.clone(),
                    rated_kw: f.rated_kw,
                    start_threshold_kw: start,
                    stop_threshold_kw: stop,
                    critical: f.critical.unwrap_or(true),
                    rules: line_rules.for_facility(f.rules.as_ref(), &key("rules"), file)?,
                });
            }
            for role in [Role::Production, Role::Treatment] {
                if !facilities.iter().any(|f| f.role() == role) {
                    return Err(err(
                        key("facilities"),
                        format!("line `{}` needs at least one {role:?} facility", l.id)
                            .to_lowercase(),
                    ));
                }
            }
            lines.push(Line {
                id: l.id.clone(),
                name: l.name.clone().unwrap_or_else(|| l.id.clone()),
                facilities,
                rules: line_rules,
            });
        }
        if lines.is_empty() {
            return Err(ConfigError::new(
                file,
                "lines",
                "at least one [[lines]] is required",
            ));
        }

        let restrictions = raw
            .restrictions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let key = |k: &str| format!("restrictions[{i}].{k}");
                let (from_ms, until_ms) = window(&r.from, &r.until, &key, file)?;
                if r.lines.is_empty() {
                    return Err(err(key("lines"), "name at least one line".into()));
                }
                for (j, line) in r.lines.iter().enumerate() {
                    if !lines.iter().any(|l| l.id == *line) {
                        return Err(err(
                            format!("restrictions[{i}].lines[{j}]"),
                            format!("line `{line}` is not defined in [[lines]]"),
                        ));
                    }
                }
                Ok(Restriction {
                    lines: r.lines.clone(),
                    from_ms,
                    until_ms,
                    reason: r.reason.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let maintenance = raw
            .maintenance
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let key = |k: &str| format!("maintenance[{i}].{k}");
                let (from_ms, until_ms) = window(&m.from, &m.until, &key, file)?;
                if m.facilities.is_empty() {
                    return Err(err(key("facilities"), "name at least one facility".into()));
                }
                for (j, facility) in m.facilities.iter().enumerate() {
                    if !lines
                        .iter()
                        .any(|l| l.facilities.iter().any(|f| f.id == *facility))
                    {
                        return Err(err(
                            format!("maintenance[{i}].facilities[{j}]"),
                            format!("facility `{facility}` is not defined in [[lines.facilities]]"),
                        ));
                    }
                }
                Ok(Maintenance {
                    facilities: m.facilities.clone(),
                    from_ms,
                    until_ms,
                    reason: m.reason.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Site {
            id: raw.site.id,
            name: raw.site.name.unwrap_or_default(),
            time_zone,
            gateways,
            meters,
            lines,
            rules: site_rules,
            restrictions,
            maintenance,
        })
    }
}

/// `[from, until)` of a declared window, ms UTC; `from` before `until`.
fn window(
    from: &str,
    until: &str,
    key: &dyn Fn(&str) -> String,
    file: &str,
) -> Result<(i64, i64), ConfigError> {
    let from_ms = rules::rfc3339_ms(from, &key("from"), file)?;
    let until_ms = rules::rfc3339_ms(until, &key("until"), file)?;
    if until_ms <= from_ms {
        return Err(ConfigError::new(
            file,
            key("until"),
            format!("`{until}` must be later than from (`{from}`)"),
        ));
    }
    Ok((from_ms, until_ms))
}

fn positive(value: u64, key: &str, file: &str) -> Result<u64, ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(file, key, "must be greater than 0"));
    }
    Ok(value)
}

fn positive_secs(value: u64, key: &str, file: &str) -> Result<Duration, ConfigError> {
    positive(value, key, file).map(Duration::from_secs)
}

/// The site file as written; see `deploy/stenter-plant.site.toml`.
mod raw {
    use super::FacilityKind;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct SiteFile {
        pub(super) site: SiteSection,
        #[serde(default)]
        pub(super) gateways: Vec<GatewaySection>,
        #[serde(default)]
        pub(super) meters: Vec<super::meter::MeterSection>,
        #[serde(default)]
        pub(super) lines: Vec<LineSection>,
        #[serde(default)]
        pub(super) rules: super::rules::raw::RulesSection,
        #[serde(default)]
        pub(super) restrictions: Vec<super::rules::raw::RestrictionSection>,
        #[serde(default)]
        pub(super) maintenance: Vec<super::rules::raw::MaintenanceSection>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct SiteSection {
        pub(super) id: String,
        pub(super) name: Option<String>,
        #[serde(default = "default_time_zone")]
        pub(super) time_zone: String,
    }

    fn default_time_zone() -> String {
        "Asia/Shanghai".into()
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct GatewaySection {
        pub(super) id: String,
        #[serde(default = "default_poll_interval_secs")]
        pub(super) poll_interval_secs: u64,
        #[serde(default = "default_modbus_timeout_ms")]
        pub(super) modbus_timeout_ms: u64,
        #[serde(default = "default_batch_interval_secs")]
        pub(super) batch_interval_secs: u64,
    }

    fn default_poll_interval_secs() -> u64 {
        30
    }
    fn default_modbus_timeout_ms() -> u64 {
        1000
    }
    fn default_batch_interval_secs() -> u64 {
        60
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct LineSection {
        pub(super) id: String,
        pub(super) name: Option<String>,
        #[serde(default)]
        pub(super) facilities: Vec<FacilitySection>,
        pub(super) rules: Option<super::rules::raw::RulesSection>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct FacilitySection {
        pub(super) id: String,
        pub(super) name: Option<String>,
        pub(super) kind: FacilityKind,
        pub(super) meter: String,
        pub(super) rated_kw: f64,
        pub(super) start_threshold_kw: f64,
        pub(super) stop_threshold_kw: Option<f64>,
        pub(super) critical: Option<bool>,
        pub(super) rules: Option<super::rules::raw::FacilityRulesSection>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
[site]
id = "plant"
name = "Example Dyeing"

[[gateways]]
id = "gw-01"
poll_interval_secs = 30

[[meters]]
id = "m-stenter"
gateway = "gw-01"
profile = "dtsu666"
tcp = "127.0.0.1:5020"
unit = 1
ct_ratio = 40

[[meters]]
id = "m-fan"
gateway = "gw-01"
profile = "sdm630"
tcp = "127.0.0.1:5020"
unit = 2

[[lines]]
id = "line1"

[[lines.facilities]]
id = "stenter"
kind = "stenter"
meter = "m-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "fan"
kind = "main_fan"
meter = "m-fan"
rated_kw = 22
start_threshold_kw = 3
stop_threshold_kw = 2
"#;

    #[test]
    fn example_site_parses_with_defaults() {
        let site = Site::from_toml(EXAMPLE, "site.toml").unwrap();
        assert_eq!(site.time_zone, chrono_tz::Asia::Shanghai);
        assert_eq!(site.gateways[0].poll_interval, Duration::from_secs(30));
        assert_eq!(site.gateways[0].modbus_timeout, Duration::from_millis(1000));
        assert_eq!(
            site.meters[0].ratios,
            crate::profile::Ratios { ct: 40.0, pt: 1.0 }
        );
        let stenter = &site.lines[0].facilities[0];
        assert_eq!(stenter.stop_threshold_kw, 16.0);
        assert_eq!(stenter.role(), Role::Production);
        assert_eq!(site.rules.r1.min_duration, Duration::from_secs(600));
        assert_eq!(site.gateway_of_line(&site.lines[0]), "gw-01");
    }

    fn error_of(text: &str) -> String {
        Site::from_toml(text, "site.toml").unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_named_with_file_table_and_line() {
        let err = error_of(&EXAMPLE.replace("unit = 2", "unit = 2\nspeed = 9600"));
        assert!(
            err.starts_with("site.toml: meters[1].speed: unknown field `speed`, expected one of"),
            "{err}"
        );
        assert!(err.ends_with("(line 24)"), "{err}");
    }

    #[test]
    fn wrong_type_is_named_with_its_key_path() {
        let err = error_of(&EXAMPLE.replace("rated_kw = 22", "rated_kw = \"22\""));
        assert_eq!(
            err,
            "site.toml: lines[0].facilities[1].rated_kw: invalid type: string \"22\", expected f64 (line 39)"
        );
    }

    #[test]
    fn missing_meter_is_named_with_its_key() {
        let err = error_of(&EXAMPLE.replace("meter = \"m-fan\"", "meter = \"m-nope\""));
        assert_eq!(
            err,
            "site.toml: lines[0].facilities[1].meter: meter `m-nope` is not defined in [[meters]]"
        );
    }

    #[test]
    fn unknown_profile_is_named_with_its_key() {
        let err = error_of(&EXAMPLE.replace("\"sdm630\"", "\"sdm999\""));
        assert!(
            err.starts_with("site.toml: meters[1].profile: unknown meter profile `sdm999`"),
            "{err}"
        );
    }

    #[test]
    fn stop_threshold_above_start_is_refused() {
        let err = error_of(&EXAMPLE.replace("stop_threshold_kw = 2", "stop_threshold_kw = 5"));
        assert!(
            err.contains("lines[0].facilities[1].stop_threshold_kw"),
            "{err}"
        );
    }

    #[test]
    fn two_meters_at_one_endpoint_and_unit_are_refused() {
        let err = error_of(&EXAMPLE.replace("unit = 2", "unit = 1"));
        assert_eq!(
            err,
            "site.toml: meters[1].unit: unit 1 on tcp://127.0.0.1:5020 is already meter `m-stenter`; one bus cannot tell them apart"
        );
    }

    /// The example with meters[1]'s transport and unit replaced by
    /// `fields`; a `[[meters.registers]]` in them makes it generic.
    fn with_meter(fields: &str) -> String {
        let mut text = EXAMPLE.replace("tcp = \"127.0.0.1:5020\"\nunit = 2", fields);
        let generic = fields.contains("[[meters.registers]]") || fields.contains("# generic");
        if generic && !fields.contains("# builtin") {
            text = text.replace("profile = \"sdm630\"", "profile = \"generic\"");
        }
        text
    }

    fn meter_error(fields: &str) -> String {
        error_of(&with_meter(fields))
    }

    fn meter_of(fields: &str) -> Meter {
        let text = with_meter(fields);
        Site::from_toml(&text, "site.toml").unwrap().meters[1].clone()
    }

    #[test]
    fn serial_meter_takes_its_profile_line_defaults() {
        let meter = meter_of("serial = \"/dev/ttyUSB0\"\nunit = 2");
        assert_eq!(
            meter.transport,
            Transport::Serial(SerialLine {
                path: "/dev/ttyUSB0".into(),
                baud: 9600,
                parity: crate::profile::Parity::None,
                data_bits: 8,
                stop_bits: 1,
            })
        );
        // 3.5 characters of 11 bits at 9600 baud.
        assert_eq!(meter.transport.inter_frame_silence().as_micros(), 4010);
        let meter = meter_of("serial = \"/dev/ttyS1\"\nbaud = 19200\nparity = \"even\"\nunit = 2");
        match meter.transport {
            Transport::Serial(line) => {
                assert_eq!(
                    (line.baud, line.parity),
                    (19200, crate::profile::Parity::Even)
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rtu_over_tcp_meter_has_a_remote_baud() {
        let meter = meter_of("rtu_over_tcp = \"10.0.0.5:4196\"\nbaud = 2400\nunit = 2");
        assert_eq!(meter.transport.bus(), "rtu-over-tcp://10.0.0.5:4196");
        assert_eq!(meter.transport.inter_frame_silence().as_micros(), 16041);
    }

    #[test]
    fn transport_errors_name_the_key() {
        assert_eq!(
            meter_error("unit = 2"),
            "site.toml: meters[1].tcp: give exactly one of `tcp`, `rtu_over_tcp` and `serial`"
        );
        assert_eq!(
            meter_error("tcp = \"127.0.0.1:5021\"\nbaud = 9600\nunit = 2"),
            "site.toml: meters[1].baud: applies only to a meter on a `serial` port"
        );
        assert_eq!(
            meter_error("serial = \"/dev/ttyUSB0\"\nstop_bits = 3\nunit = 2"),
            "site.toml: meters[1].stop_bits: 3 is not 1 or 2"
        );
        assert_eq!(
            meter_error("serial = \"/dev/ttyUSB0\"\nparity = \"mark\"\nunit = 2"),
            "site.toml: meters[1].parity: unknown variant `mark`, expected one of `none`, `even`, `odd` (line 23)"
        );
    }

    #[test]
    fn meters_on_one_serial_port_must_agree_on_its_settings() {
        let text = EXAMPLE
            .replace(
                "tcp = \"127.0.0.1:5020\"\nunit = 1",
                "serial = \"/dev/ttyUSB0\"\nunit = 1",
            )
            .replace(
                "tcp = \"127.0.0.1:5020\"\nunit = 2",
                "serial = \"/dev/ttyUSB0\"\nbaud = 19200\nunit = 2",
            );
        assert_eq!(
            error_of(&text),
            "site.toml: meters[1].baud: line settings differ from meter `m-stenter` on the same bus serial:///dev/ttyUSB0"
        );
    }

    #[test]
    fn generic_meter_builds_its_profile_from_registers() {
        let meter = meter_of(
            "tcp = \"127.0.0.1:5021\"\nunit = 2\n\
             [[meters.registers]]\nquantity = \"power\"\naddress = 0x16A\ntype = \"i32\"\n\
             word_order = \"CDAB\"\nscale = 1\nunit = \"W\"\n\
             [[meters.registers]]\nquantity = \"voltage\"\nphase = 2\naddress = 0x62\n\
             function = 4\ntype = \"u16\"\nscale = 0.1\nunit = \"V\"",
        )
        .profile;
        assert_eq!(meter.name, "generic");
        let power = meter.fields[0];
        assert_eq!(power.quantity, crate::profile::Quantity::Power);
        assert_eq!(power.address, 0x16A);
        assert_eq!(power.value_type, crate::profile::ValueType::I32);
        assert_eq!(power.word_order, crate::profile::WordOrder::Cdab);
        assert_eq!(power.scale, 0.001); // W to kW
        let voltage = meter.fields[1];
        assert_eq!(voltage.quantity, crate::profile::Quantity::Voltage(1));
        assert_eq!(
            voltage.function,
            crate::profile::FunctionCode::ReadInputRegisters
        );
    }

    #[test]
    fn generic_meter_errors_name_the_register_key() {
        let generic = |registers: &str| {
            meter_error(&format!(
                "tcp = \"127.0.0.1:5021\"\nunit = 2\n# generic\n{registers}"
            ))
        };
        assert_eq!(
            generic(""),
            "site.toml: meters[1].registers: a generic meter needs a [[meters.registers]] with quantity = \"power\""
        );
        assert_eq!(
            generic("[[meters.registers]]\nquantity = \"power\"\naddress = 1\nunit = \"kWh\""),
            "site.toml: meters[1].registers[0].unit: `kWh` is not a unit of power (one of kW, W)"
        );
        assert_eq!(
            generic("[[meters.registers]]\nquantity = \"power\"\naddress = 1\nunit = \"W\"\nword_order = \"ACBD\""),
            "site.toml: meters[1].registers[0].word_order: unknown word order `ACBD` (ABCD, CDAB, BADC, DCBA)"
        );
        assert_eq!(
            generic("[[meters.registers]]\nquantity = \"power\"\naddress = 1\nunit = \"W\"\nfunction = 6"),
            "site.toml: meters[1].registers[0].function: 6 is not 3 or 4"
        );
        let builtin = meter_error("tcp = \"127.0.0.1:5021\"\nunit = 2\n# builtin\n[[meters.registers]]\nquantity = \"power\"\naddress = 1");
        assert!(
            builtin.starts_with("site.toml: meters[1].registers: only a `generic` meter"),
            "{builtin}"
        );
    }

    #[test]
    fn bad_ids_are_refused() {
        assert!(validate_id("gw/1").is_err());
        assert!(validate_id("gw+").is_err());
        assert!(validate_id("").is_err());
        assert!(validate_id("line_1-a").is_ok());
        let err = error_of(&EXAMPLE.replace("id = \"gw-01\"", "id = \"gw#\""));
        assert!(err.contains("gateways[0].id"), "{err}");
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    #[test]
    fn deploy_example_site_file_is_valid() {
        let text = include_str!("../../deploy/stenter-plant.site.toml");
        let site = Site::from_toml(text, "deploy/stenter-plant.site.toml").unwrap();
        assert_eq!(site.lines.len(), 2);
        assert_eq!(site.meters.len(), 10);
        let pump = &site.lines[0].facilities[1];
        assert_eq!((pump.kind, pump.critical), (FacilityKind::SprayPump, false));
    }

    #[test]
    fn deploy_field_bus_example_is_valid() {
        let text = include_str!("../../deploy/field-buses.site.example.toml");
        let site = Site::from_toml(text, "deploy/field-buses.site.example.toml").unwrap();
        let buses: Vec<String> = site.meters.iter().map(|m| m.transport.bus()).collect();
        assert_eq!(
            buses,
            [
                "serial:///dev/ttyUSB0",
                "serial:///dev/ttyUSB0",
                "rtu-over-tcp://192.168.10.20:4196",
                "tcp://192.168.10.21:502"
            ]
        );
        let esp = site.meter("esp-3").unwrap();
        assert_eq!(esp.profile.name, "generic");
        assert_eq!(esp.profile.fields.len(), 3);
    }
}

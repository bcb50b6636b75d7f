//! Rule settings (R1-R7, DOMAIN.md) and the declared windows of a site:
//! restriction windows (R6) and maintenance windows.
//!
//! Three levels, each overriding the one above for the keys it sets:
//! - `[rules]` and `[rules.rN]` of the site (defaults below when absent);
//! - `[lines.rules]` / `[lines.rules.rN]` inside a `[[lines]]` entry;
//! - `[lines.facilities.rules.r4]` (`low_load_fraction`,
//!   `producing_fraction`) and `[lines.facilities.rules.r7]`
//!   (`frozen_duration_secs`) for settings about one facility.
//!
//! Defaults ([E] in DOMAIN.md): R1 600 s / clear 120 s; R2 late after
//! 300 s; R3 after 300 s; R4 900 s / clear 120 s, treatment below 0.4 x
//! rated while production above 0.2 x rated; R5 gap of more than 3 polls;
//! R6 300 s / clear 120 s; R7 frozen for 3,600 s; debounce 2 samples; stale
//! after 3 polls. Every duration is positive, every fraction in (0, 1].

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Rule settings in effect for one line (the site's, with the line's
/// overrides applied). [`Site::rules`](super::Site) holds the site level.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub r1: R1Settings,
    pub r2: R2Settings,
    pub r3: R3Settings,
    pub r4: R4Settings,
    pub r5: R5Settings,
    pub r6: R1Settings,
    pub r7: R7Settings,
    /// Consecutive samples beyond a threshold before a facility changes
    /// state (debounce).
    pub debounce_samples: u32,
    /// A facility with no valid sample for this many poll intervals is
    /// unknown (never stopped).
    pub stale_after_polls: u32,
}

/// When an interval opens and closes: it opens once its condition has held
/// for `min_duration` and closes once it has been clear for
/// `clear_duration`. Used by R1, R4 (with fractions) and R6.
#[derive(Debug, Clone, PartialEq)]
pub struct R1Settings {
    pub min_duration: Duration,
    pub clear_duration: Duration,
}

/// R2: treatment started more than `late_after` after production started.
#[derive(Debug, Clone, PartialEq)]
pub struct R2Settings {
    pub late_after: Duration,
}

/// R3: production kept running more than `after` after treatment stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct R3Settings {
    pub after: Duration,
}

/// R4: low-load treatment.
#[derive(Debug, Clone, PartialEq)]
pub struct R4Settings {
    pub min_duration: Duration,
    pub clear_duration: Duration,
    /// Default of [`FacilityRules::low_load_fraction`].
    pub low_load_fraction: f64,
    /// Default of [`FacilityRules::producing_fraction`].
    pub producing_fraction: f64,
}

/// R5: data interruption.
#[derive(Debug, Clone, PartialEq)]
pub struct R5Settings {
    /// No valid sample for more than this many poll intervals of the
    /// gateway is an interruption (of the gateway, or of one meter while
    /// others report).
    pub gap_polls: u32,
}

/// R7: frozen values.
#[derive(Debug, Clone, PartialEq)]
pub struct R7Settings {
    /// Default of [`FacilityRules::frozen_after`].
    pub frozen_duration: Duration,
}

/// Settings about one facility, resolved from site, line and facility.
#[derive(Debug, Clone, PartialEq)]
pub struct FacilityRules {
    /// R4, treatment: running below this fraction of rated is low load.
    pub low_load_fraction: f64,
    /// R4, production: above this fraction of rated counts as producing.
    pub producing_fraction: f64,
    /// R7: the same non-zero power for this long is a frozen value.
    pub frozen_after: Duration,
}

/// A declared stop or restriction order (停限产) for some lines: production
/// running inside it is R6. Times are ms UTC, `[from_ms, until_ms)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Restriction {
    pub lines: Vec<String>,
    pub from_ms: i64,
    pub until_ms: i64,
    pub reason: String,
}

/// A declared maintenance window (异常申报) for some facilities,
/// `[from_ms, until_ms)` ms UTC. Inside it a facility takes part in no
/// rule: it counts as neither running nor stopped, its missing or frozen
/// data raises nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Maintenance {
    pub facilities: Vec<String>,
    pub from_ms: i64,
    pub until_ms: i64,
    pub reason: String,
}

impl Rules {
    /// The built-in defaults.
    pub fn defaults() -> Rules {
        Rules {
            r1: R1Settings {
                min_duration: Duration::from_secs(600),
                clear_duration: Duration::from_secs(120),
            },
            r2: R2Settings {
                late_after: Duration::from_secs(300),
            },
            r3: R3Settings {
                after: Duration::from_secs(300),
            },
            r4: R4Settings {
                min_duration: Duration::from_secs(900),
                clear_duration: Duration::from_secs(120),
                low_load_fraction: 0.4,
                producing_fraction: 0.2,
            },
            r5: R5Settings { gap_polls: 3 },
            r6: R1Settings {
                min_duration: Duration::from_secs(300),
                clear_duration: Duration::from_secs(120),
            },
            r7: R7Settings {
                frozen_duration: Duration::from_secs(3600),
            },
            debounce_samples: 2,
            stale_after_polls: 3,
        }
    }

    /// These settings with the keys set in `raw` replaced; `prefix` is the
    /// key path of `raw` (e.g. `rules` or `lines[0].rules`).
    pub(super) fn overridden(
        &self,
        raw: &raw::RulesSection,
        prefix: &str,
        file: &str,
    ) -> Result<Rules, ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let secs = |value: Option<u64>, k: &str, old: Duration| match value {
            None => Ok(old),
            Some(0) => Err(ConfigError::new(file, key(k), "must be greater than 0")),
            Some(s) => Ok(Duration::from_secs(s)),
        };
        let count = |value: Option<u32>, k: &str, old: u32| match value {
            None => Ok(old),
            Some(0) => Err(ConfigError::new(file, key(k), "must be greater than 0")),
            Some(n) => Ok(n),
        };
        let mut rules = self.clone();
        if let Some(r1) = &raw.r1 {
            rules.r1 = timing(r1, &rules.r1, &key("r1"), file)?;
        }
        if let Some(r2) = &raw.r2 {
            rules.r2.late_after = secs(
                r2.late_after_secs,
                "r2.late_after_secs",
                rules.r2.late_after,
            )?;
        }
        if let Some(r3) = &raw.r3 {
            rules.r3.after = secs(r3.after_secs, "r3.after_secs", rules.r3.after)?;
        }
        if let Some(r4) = &raw.r4 {
            rules.r4.min_duration = secs(
                r4.min_duration_secs,
                "r4.min_duration_secs",
                rules.r4.min_duration,
            )?;
            rules.r4.clear_duration = secs(
                r4.clear_duration_secs,
                "r4.clear_duration_secs",
                rules.r4.clear_duration,
            )?;
            rules.r4.low_load_fraction = fraction(
                r4.low_load_fraction,
                &key("r4.low_load_fraction"),
                rules.r4.low_load_fraction,
                file,
            )?;
            rules.r4.producing_fraction = fraction(
                r4.producing_fraction,
                &key("r4.producing_fraction"),
                rules.r4.producing_fraction,
                file,
            )?;
        }
        if let Some(r5) = &raw.r5 {
            rules.r5.gap_polls = count(r5.gap_polls, "r5.gap_polls", rules.r5.gap_polls)?;
        }
        if let Some(r6) = &raw.r6 {
            rules.r6 = timing(r6, &rules.r6, &key("r6"), file)?;
        }
        if let Some(r7) = &raw.r7 {
            rules.r7.frozen_duration = secs(
                r7.frozen_duration_secs,
                "r7.frozen_duration_secs",
                rules.r7.frozen_duration,
            )?;
        }
        rules.debounce_samples = count(
            raw.debounce_samples,
            "debounce_samples",
            rules.debounce_samples,
        )?;
        rules.stale_after_polls = count(
            raw.stale_after_polls,
            "stale_after_polls",
            rules.stale_after_polls,
        )?;
        Ok(rules)
    }

    /// The settings of one facility on a line with these rules, with the
    /// facility's own overrides (`prefix` is their key path).
    pub(super) fn for_facility(
        &self,
        raw: Option<&raw::FacilityRulesSection>,
        prefix: &str,
        file: &str,
    ) -> Result<FacilityRules, ConfigError> {
        let mut settings = FacilityRules {
            low_load_fraction: self.r4.low_load_fraction,
            producing_fraction: self.r4.producing_fraction,
            frozen_after: self.r7.frozen_duration,
        };
        let Some(raw) = raw else {
            return Ok(settings);
        };
        if let Some(r4) = &raw.r4 {
            settings.low_load_fraction = fraction(
                r4.low_load_fraction,
                &format!("{prefix}.r4.low_load_fraction"),
                settings.low_load_fraction,
                file,
            )?;
            settings.producing_fraction = fraction(
                r4.producing_fraction,
                &format!("{prefix}.r4.producing_fraction"),
                settings.producing_fraction,
                file,
            )?;
        }
        if let Some(r7) = &raw.r7 {
            match r7.frozen_duration_secs {
                None => {}
                Some(0) => {
                    return Err(ConfigError::new(
                        file,
                        format!("{prefix}.r7.frozen_duration_secs"),
                        "must be greater than 0",
                    ))
                }
                Some(s) => settings.frozen_after = Duration::from_secs(s),
            }
        }
        Ok(settings)
    }
}

impl Default for Rules {
    fn default() -> Rules {
        Rules::defaults()
    }
}

fn timing(
    raw: &raw::TimingSection,
    old: &R1Settings,
    prefix: &str,
    file: &str,
) -> Result<R1Settings, ConfigError> {
    let secs = |value: Option<u64>, k: &str, old: Duration| match value {
        None => Ok(old),
        Some(0) => Err(ConfigError::new(
            file,
            format!("{prefix}.{k}"),
            "must be greater than 0",
        )),
        Some(s) => Ok(Duration::from_secs(s)),
    };
    Ok(R1Settings {
        min_duration: secs(raw.min_duration_secs, "min_duration_secs", old.min_duration)?,
        clear_duration: secs(
            raw.clear_duration_secs,
            "clear_duration_secs",
            old.clear_duration,
        )?,
    })
}

fn fraction(value: Option<f64>, key: &str, old: f64, file: &str) -> Result<f64, ConfigError> {
    match value {
        None => Ok(old),
        Some(f) if f.is_finite() && f > 0.0 && f <= 1.0 => Ok(f),
        Some(f) => Err(ConfigError::new(
            file,
            key,
            format!("{f} must be a fraction greater than 0 and at most 1"),
        )),
    }
}

/// Parses an RFC 3339 time (with offset) into ms UTC.
pub(super) fn rfc3339_ms(text: &str, key: &str, file: &str) -> Result<i64, ConfigError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ConfigError::new(
                file,
                key,
                format!("`{text}` is not an RFC 3339 time such as 2022-12-13T08:00:00+08:00 ({e})"),
            )
        })
}

/// The rule sections as written; every key optional, so a level sets only
/// what it overrides.
pub(super) mod raw {
    use super::Deserialize;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct RulesSection {
        pub(in crate::site) r1: Option<TimingSection>,
        pub(in crate::site) r2: Option<R2Section>,
        pub(in crate::site) r3: Option<R3Section>,
        pub(in crate::site) r4: Option<R4Section>,
        pub(in crate::site) r5: Option<R5Section>,
        pub(in crate::site) r6: Option<TimingSection>,
        pub(in crate::site) r7: Option<R7Section>,
        pub(in crate::site) debounce_samples: Option<u32>,
        pub(in crate::site) stale_after_polls: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct TimingSection {
        pub(in crate::site) min_duration_secs: Option<u64>,
        pub(in crate::site) clear_duration_secs: Option<u64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct R2Section {
        pub(in crate::site) late_after_secs: Option<u64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct R3Section {
        pub(in crate::site) after_secs: Option<u64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct R4Section {
        pub(in crate::site) min_duration_secs: Option<u64>,
        pub(in crate::site) clear_duration_secs: Option<u64>,
        pub(in crate::site) low_load_fraction: Option<f64>,
        pub(in crate::site) producing_fraction: Option<f64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct R5Section {
        pub(in crate::site) gap_polls: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct R7Section {
        pub(in crate::site) frozen_duration_secs: Option<u64>,
    }

    /// `[lines.facilities.rules]`: only settings about one facility.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct FacilityRulesSection {
        pub(in crate::site) r4: Option<FacilityR4Section>,
        pub(in crate::site) r7: Option<R7Section>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct FacilityR4Section {
        pub(in crate::site) low_load_fraction: Option<f64>,
        pub(in crate::site) producing_fraction: Option<f64>,
    }

    /// `[[restrictions]]`.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct RestrictionSection {
        pub(in crate::site) lines: Vec<String>,
        pub(in crate::site) from: String,
        pub(in crate::site) until: String,
        #[serde(default)]
        pub(in crate::site) reason: String,
    }

    /// `[[maintenance]]`.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(in crate::site) struct MaintenanceSection {
        pub(in crate::site) facilities: Vec<String>,
        pub(in crate::site) from: String,
        pub(in crate::site) until: String,
        #[serde(default)]
        pub(in crate::site) reason: String,
    }
}

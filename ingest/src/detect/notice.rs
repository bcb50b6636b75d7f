//! Notice texts people act on, in Chinese and English, times in the site's
//! zone, e.g. "The alarm started at 2022-12-13 14:03 and lasted 27 minutes,
//! involving condensers, fans, high-voltage electrostatic. Please check and
//! restore in time." A data interruption reads e.g. "Tongxiang Example
//! Dyeing: data interruption. Gateway gw-01 discarded 1,234 readings
//! (buffer full) between 2022-12-13 09:00 and 2022-12-13 11:30; 3 batches
//! are missing. These readings cannot be recovered."

use chrono::{DateTime, SecondsFormat, TimeZone};
use facwatch_proto::site::{FacilityKind, Line, Site};

use super::{DataLoss, Rule};

pub(super) struct Notice {
    pub(super) en: String,
    pub(super) zh: String,
}

/// RFC 3339 with the zone's offset, seconds precision unless ms are set.
pub(super) fn rfc3339(ms: i64, tz: chrono_tz::Tz) -> String {
    let format = if ms % 1000 == 0 {
        SecondsFormat::Secs
    } else {
        SecondsFormat::Millis
    };
    local(ms, tz).to_rfc3339_opts(format, false)
}

fn local(ms: i64, tz: chrono_tz::Tz) -> DateTime<chrono_tz::Tz> {
    tz.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(|| tz.timestamp_millis_opt(0).single().expect("epoch exists"))
}

/// Display order of facility kinds in a notice: the exhaust train's order
/// as people name it.
fn kind_rank(kind: FacilityKind) -> u8 {
    match kind {
        FacilityKind::Condenser => 0,
        FacilityKind::MainFan => 1,
        FacilityKind::HvEsp => 2,
        FacilityKind::SprayPump => 3,
        FacilityKind::Treatment => 4,
        FacilityKind::Stenter => 5,
        FacilityKind::Boiler => 6,
        FacilityKind::Production => 7,
    }
}

/// `until_ms` is the end of a closed interval or the latest data time of an
/// open one.
pub(super) fn render(
    site: &Site,
    line: &Line,
    rule: Rule,
    start_ms: i64,
    until_ms: i64,
    closed: bool,
    facility_ids: &[String],
) -> Notice {
    let mut kinds: Vec<FacilityKind> = line
        .facilities
        .iter()
        .filter(|f| facility_ids.contains(&f.id))
        .map(|f| f.kind)
        .collect();
    kinds.sort_by_key(|k| kind_rank(*k));
    kinds.dedup();
    let nouns_en: Vec<&str> = kinds.iter().map(|k| k.noun_en()).collect();
    let nouns_zh: Vec<&str> = kinds.iter().map(|k| k.noun_zh()).collect();
    let start = local(start_ms, site.time_zone).format("%Y-%m-%d %H:%M");
    let minutes = ((until_ms - start_ms) as f64 / 60_000.0).round() as i64;
    let (what_en, what_zh) = match rule {
        Rule::R1 => (
            "treatment equipment stopped while production ran",
            "生产设施运行期间治污设施停运",
        ),
        Rule::R2 => (
            "treatment equipment started late after production started",
            "治污设施晚于生产设施开启",
        ),
        Rule::R3 => (
            "treatment equipment stopped before production stopped",
            "治污设施先于生产设施停运",
        ),
        Rule::R4 => (
            "treatment equipment ran at low load while production ran",
            "生产设施运行期间治污设施低负荷运行",
        ),
        Rule::R5 => ("meter data missing", "工况数据缺失"),
        Rule::R6 => (
            "production ran during a declared restriction",
            "停限产期间生产设施运行",
        ),
        Rule::R7 => (
            "frozen or implausible meter values",
            "工况数据恒值或异常跳变",
        ),
    };
    let site_name = site_name(site);
    let en = if closed {
        format!(
            "{site_name}, {}: {what_en}. The alarm started at {start} and lasted {minutes} minutes, involving {}. Please check and restore in time.",
            line.name,
            nouns_en.join(", ")
        )
    } else {
        format!(
            "{site_name}, {}: {what_en}. The alarm started at {start} and has lasted {minutes} minutes so far, involving {}. Please check and restore in time.",
            line.name,
            nouns_en.join(", ")
        )
    };
    let zh = if closed {
        format!(
            "{site_name}，{}：{what_zh}。报警开始于{start}，持续{minutes}分钟，涉及{}，请及时检查恢复。",
            line.name,
            nouns_zh.join("、")
        )
    } else {
        format!(
            "{site_name}，{}：{what_zh}。报警开始于{start}，已持续{minutes}分钟，涉及{}，请及时检查恢复。",
            line.name,
            nouns_zh.join("、")
        )
    };
    Notice { en, zh }
}

fn site_name(site: &Site) -> &str {
    if site.name.is_empty() {
        &site.id
    } else {
        &site.name
    }
}

/// The notice of an R5 event for samples `gateway` discarded between
/// `start_ms` and `end_ms`.
pub(super) fn render_data_loss(
    site: &Site,
    gateway: &str,
    start_ms: i64,
    end_ms: i64,
    loss: DataLoss,
) -> Notice {
    let site_name = site_name(site);
    let start = local(start_ms, site.time_zone).format("%Y-%m-%d %H:%M");
    let end = local(end_ms, site.time_zone).format("%Y-%m-%d %H:%M");
    let readings = grouped(loss.samples_dropped);
    let (missing_en, missing_zh) = match loss.batches_missing {
        0 => (String::new(), String::new()),
        1 => (
            "; 1 batch is missing".to_string(),
            "，缺失1个批次".to_string(),
        ),
        n => (
            format!("; {} batches are missing", grouped(n)),
            format!("，缺失{}个批次", grouped(n)),
        ),
    };
    let noun = if loss.samples_dropped == 1 {
        "reading"
    } else {
        "readings"
    };
    Notice {
        en: format!(
            "{site_name}: data interruption. Gateway {gateway} discarded {readings} {noun} (buffer full) between {start} and {end}{missing_en}. These readings cannot be recovered."
        ),
        zh: format!(
            "{site_name}：工况数据缺失。网关{gateway}缓存已满，{start}至{end}期间丢弃{readings}条读数{missing_zh}，无法补传。"
        ),
    }
}

/// The notice of a whole-gateway data interruption seen in data time, from
/// `start_ms` (the last valid sample) to `until_ms`.
pub(super) fn render_gateway_gap(
    site: &Site,
    gateway: &str,
    start_ms: i64,
    until_ms: i64,
    closed: bool,
) -> Notice {
    let site_name = site_name(site);
    let start = local(start_ms, site.time_zone).format("%Y-%m-%d %H:%M");
    let minutes = ((until_ms - start_ms) as f64 / 60_000.0).round() as i64;
    if closed {
        Notice {
            en: format!("{site_name}: data interruption. Gateway {gateway} delivered no valid reading from {start} for {minutes} minutes. Please check the gateway and meters."),
            zh: format!("{site_name}：工况数据缺失。网关{gateway}自{start}起{minutes}分钟无有效数据，请检查网关及电表。"),
        }
    } else {
        Notice {
            en: format!("{site_name}: data interruption. Gateway {gateway} has delivered no valid reading since {start} ({minutes} minutes so far). Please check the gateway and meters."),
            zh: format!("{site_name}：工况数据缺失。网关{gateway}自{start}起无有效数据，已持续{minutes}分钟，请检查网关及电表。"),
        }
    }
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_234), "1,234");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }
}

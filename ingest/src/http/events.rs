//! `GET /api/v1/events`: query parsing and paging, pure functions.
//!
//! Order: newest first by `(start, id)`, both descending, so the order is
//! total and a cursor (`<start_ms>-<id>` of the last event of a page) names
//! an exact position: the next page holds the events strictly after it in
//! that order. Filtering is done in memory over every stored event (fine
//! at the sizes of one plant; an index by start time is the next step).
//!
//! Filters: `site`, `line`, `rule` (R1..R7) exact; `from` <= start < `to`
//! (RFC 3339); `open=true|false` by status; `limit` 1..=1000 (default 100).

use chrono::DateTime;

use crate::detect::{Event, EventStatus, Rule};

pub(crate) const DEFAULT_LIMIT: usize = 100;
pub(crate) const MAX_LIMIT: usize = 1000;

/// A bad query parameter: which one and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadParameter {
    pub(crate) parameter: String,
    pub(crate) problem: String,
}

fn bad(parameter: &str, problem: impl Into<String>) -> BadParameter {
    BadParameter {
        parameter: parameter.to_string(),
        problem: problem.into(),
    }
}

/// A parsed `/api/v1/events` query.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct EventQuery {
    pub(crate) site: Option<String>,
    pub(crate) line: Option<String>,
    pub(crate) rule: Option<Rule>,
    pub(crate) from_ms: Option<i64>,
    pub(crate) to_ms: Option<i64>,
    pub(crate) open: Option<bool>,
    pub(crate) limit: usize,
    pub(crate) cursor: Option<(i64, String)>,
}

impl EventQuery {
    /// Parses the query pairs; unknown or repeated parameters are errors.
    pub(crate) fn parse(pairs: &[(String, String)]) -> Result<EventQuery, BadParameter> {
        let mut query = EventQuery {
            limit: DEFAULT_LIMIT,
            ..EventQuery::default()
        };
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name.as_str()) {
                return Err(bad(name, "is given more than once"));
            }
            seen.push(name);
            match name.as_str() {
                "site" => query.site = Some(value.clone()),
                "line" => query.line = Some(value.clone()),
                "rule" => query.rule = Some(parse_rule(value)?),
                "from" => query.from_ms = Some(parse_time("from", value)?),
                "to" => query.to_ms = Some(parse_time("to", value)?),
                "open" => {
                    query.open = Some(match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("open", format!("`{value}` is not true or false"))),
                    })
                }
                "limit" => {
                    query.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            bad(
                                "limit",
                                format!("`{value}` is not a number from 1 to {MAX_LIMIT}"),
                            )
                        })?
                }
                "cursor" => query.cursor = Some(parse_cursor(value)?),
                other => {
                    return Err(bad(
                        other,
                        "is not a parameter (site, line, rule, from, to, open, limit, cursor)",
                    ))
                }
            }
        }
        Ok(query)
    }

    fn matches(&self, event: &Event) -> bool {
        self.site.as_ref().is_none_or(|s| *s == event.site)
            && self.line.as_ref().is_none_or(|l| *l == event.line)
            && self.rule.is_none_or(|r| r == event.rule)
            && self.from_ms.is_none_or(|from| event.start_ms >= from)
            && self.to_ms.is_none_or(|to| event.start_ms < to)
            && self
                .open
                .is_none_or(|open| open == (event.status == EventStatus::Open))
            && self.cursor.as_ref().is_none_or(|(start, id)| {
                (event.start_ms, event.id.as_str()) < (*start, id.as_str())
            })
    }
}

/// One page of `events` (any order) for `query`, newest first, and the
/// cursor of the next page if there are more.
pub(crate) fn page(mut events: Vec<Event>, query: &EventQuery) -> (Vec<Event>, Option<String>) {
    events.retain(|e| query.matches(e));
    events.sort_by(|a, b| (b.start_ms, &b.id).cmp(&(a.start_ms, &a.id)));
    let more = events.len() > query.limit;
    events.truncate(query.limit);
    let next = more
        .then(|| events.last().map(|e| format!("{}-{}", e.start_ms, e.id)))
        .flatten();
    (events, next)
}

fn parse_rule(value: &str) -> Result<Rule, BadParameter> {
    value
        .strip_prefix('R')
        .and_then(|n| n.parse::<u8>().ok())
        .and_then(|n| Rule::try_from(n).ok())
        .ok_or_else(|| bad("rule", format!("`{value}` is not a rule (R1 to R7)")))
}

fn parse_time(parameter: &str, value: &str) -> Result<i64, BadParameter> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            bad(
                parameter,
                format!("`{value}` is not an RFC 3339 time (e.g. 2022-12-13T14:53:30+08:00)"),
            )
        })
}

fn parse_cursor(value: &str) -> Result<(i64, String), BadParameter> {
    let parsed = value.split_once('-').and_then(|(start, id)| {
        let start = start.parse::<i64>().ok()?;
        let hex = !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then(|| (start, id.to_string()))
    });
    parsed.ok_or_else(|| {
        bad(
            "cursor",
            format!("`{value}` is not a cursor from a previous page"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_parameter() {
        let query = EventQuery::parse(&pairs(&[
            ("site", "plant"),
            ("line", "line-a"),
            ("rule", "R5"),
            ("from", "2022-12-13T14:00:00+08:00"),
            ("to", "2022-12-13T06:00:01Z"),
            ("open", "false"),
            ("limit", "2"),
            ("cursor", "1670914410000-ab12"),
        ]))
        .unwrap();
        assert_eq!(
            query,
            EventQuery {
                site: Some("plant".into()),
                line: Some("line-a".into()),
                rule: Some(Rule::R5),
                from_ms: Some(1_670_911_200_000),
                to_ms: Some(1_670_911_201_000),
                open: Some(false),
                limit: 2,
                cursor: Some((1_670_914_410_000, "ab12".into())),
            }
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        let problem =
            |name: &str, value: &str| EventQuery::parse(&pairs(&[(name, value)])).unwrap_err();
        assert_eq!(problem("from", "garbage").parameter, "from");
        assert_eq!(
            problem("rule", "R8").problem,
            "`R8` is not a rule (R1 to R7)"
        );
        assert_eq!(problem("limit", "0").parameter, "limit");
        assert_eq!(problem("limit", "1001").parameter, "limit");
        assert_eq!(problem("open", "yes").parameter, "open");
        assert_eq!(problem("cursor", "x-y").parameter, "cursor");
        assert_eq!(problem("colour", "red").parameter, "colour");
        assert_eq!(
            EventQuery::parse(&pairs(&[("site", "a"), ("site", "b")]))
                .unwrap_err()
                .problem,
            "is given more than once"
        );
    }
}

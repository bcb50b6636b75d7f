//! MQTT topic names. `{gw}` is a gateway id, `{site}` a site id; both are
//! checked by [`crate::site::validate_id`] so they never contain `/`, `+` or
//! `#`.
//!
//! | topic                        | direction          | QoS | retained |
//! |------------------------------|--------------------|-----|----------|
//! | `facwatch/v1/{gw}/batch`     | gateway -> ingest  | 1   | no       |
//! | `facwatch/v1/{gw}/ack`       | ingest -> gateway  | 1   | yes      |
//! | `facwatch/v1/{gw}/status`    | gateway            | 1   | yes, LWT |
//! | `facwatch/v1/events/{site}`  | ingest -> platform | 1   | no       |
//! | `facwatch/v1/alerts/{site}`  | ingest -> platform | 1   | no       |

const PREFIX: &str = "facwatch/v1/";

/// Subscription filter matching every gateway's batch topic.
pub const BATCH_FILTER: &str = "facwatch/v1/+/batch";

/// Subscription filter matching every site's events topic.
pub const EVENTS_FILTER: &str = "facwatch/v1/events/+";

pub fn batch(gateway: &str) -> String {
    format!("{PREFIX}{gateway}/batch")
}

pub fn ack(gateway: &str) -> String {
    format!("{PREFIX}{gateway}/ack")
}

pub fn status(gateway: &str) -> String {
    format!("{PREFIX}{gateway}/status")
}

pub fn events(site: &str) -> String {
    format!("{PREFIX}events/{site}")
}

/// Connectivity alerts of a site (a gateway silent, and back), apart from
/// its events.
pub fn alerts(site: &str) -> String {
    format!("{PREFIX}alerts/{site}")
}

/// The gateway id of a batch topic, or `None` if `topic` is not one.
pub fn gateway_of_batch_topic(topic: &str) -> Option<&str> {
    let gateway = topic.strip_prefix(PREFIX)?.strip_suffix("/batch")?;
    (!gateway.is_empty() && !gateway.contains('/') && gateway != "events" && gateway != "alerts")
        .then_some(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_have_the_documented_shape() {
        assert_eq!(batch("gw-01"), "facwatch/v1/gw-01/batch");
        assert_eq!(ack("gw-01"), "facwatch/v1/gw-01/ack");
        assert_eq!(status("gw-01"), "facwatch/v1/gw-01/status");
        assert_eq!(events("plant"), "facwatch/v1/events/plant");
        assert_eq!(alerts("plant"), "facwatch/v1/alerts/plant");
    }

    #[test]
    fn batch_topic_parses_back_to_its_gateway() {
        assert_eq!(gateway_of_batch_topic(&batch("gw-01")), Some("gw-01"));
        assert_eq!(gateway_of_batch_topic("facwatch/v1/gw-01/ack"), None);
        assert_eq!(gateway_of_batch_topic("facwatch/v1//batch"), None);
        assert_eq!(gateway_of_batch_topic("facwatch/v1/a/b/batch"), None);
        assert_eq!(gateway_of_batch_topic("other/v1/gw/batch"), None);
        assert_eq!(gateway_of_batch_topic("facwatch/v1/alerts/batch"), None);
    }
}

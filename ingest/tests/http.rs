//! The ingest's HTTP API against a running ingest (embedded broker on port
//! 0, `[http]` on port 0, learnt from `Stats::http_addr`): events as stored,
//! pagination, parameter errors, sites, health, readiness and metrics.
//! Every wait is on a counter or a response, bounded by [`LIMIT`].

use std::sync::Arc;
use std::time::Duration;

use facwatch_ingest::broker::{start_embedded, MAX_PACKET_BYTES};
use facwatch_ingest::{HttpSettings, MqttSettings, Settings, Stats};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

const SITE: &str = r#"
[site]
id = "plant"
name = "Plant"
time_zone = "Asia/Shanghai"

[[gateways]]
id = "gw-b"

[[meters]]
id = "b-stenter"
gateway = "gw-b"
profile = "dtsu666"
tcp = "127.0.0.1:5021"
unit = 1

[[meters]]
id = "b-fan"
gateway = "gw-b"
profile = "sdm630"
tcp = "127.0.0.1:5021"
unit = 2

[[lines]]
id = "line-b"
name = "Line B"

[[lines.facilities]]
id = "b-stenter"
kind = "stenter"
meter = "b-stenter"
rated_kw = 150
start_threshold_kw = 20

[[lines.facilities]]
id = "b-fan"
kind = "main_fan"
meter = "b-fan"
rated_kw = 22
start_threshold_kw = 4
"#;

fn batch(seq: u64, samples: usize, dropped_before: u64) -> Batch {
    Batch {
        gateway: "gw-b".into(),
        seq,
        dropped_before,
        samples: (0..samples)
            .map(|i| Sample {
                meter: "b-fan".into(),
                time_ms: 1_670_911_380_000 + (seq as i64 * 100 + i as i64) * 30_000,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(10.0),
                    ..Values::default()
                },
            })
            .collect(),
    }
}

/// GET `path` on the API: (status, body).
async fn get(client: &reqwest::Client, base: &str, path: &str) -> (u16, String) {
    let response = timeout(LIMIT, client.get(format!("{base}{path}")).send())
        .await
        .expect("response in time")
        .expect("response");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn get_json(client: &reqwest::Client, base: &str, path: &str) -> (u16, Value) {
    let (status, body) = get(client, base, path).await;
    (status, serde_json::from_str(&body).expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_events_sites_health_and_metrics() {
    timeout(LIMIT * 3, async {
        let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let site = Site::from_toml(SITE, "plant.site.toml").unwrap();
        let mut settings = Settings::new(
            vec![site],
            dir.path().join("ingest.redb"),
            MqttSettings {
                host: broker.addr.ip().to_string(),
                port: broker.addr.port(),
                client_id: "facwatch-ingest".into(),
            },
        )
        .unwrap();
        settings.http = Some(HttpSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
        });
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(facwatch_ingest::run(settings, stats.clone(), shutdown.clone()));
        timeout(LIMIT, stats.wait_until(|s| s.broker_subscriptions >= 1))
            .await
            .expect("ingest subscribed to batches");
        let addr = stats.http_addr().expect("bound before the broker connection");
        assert_ne!(addr.port(), 0);
        let base = format!("http://{addr}");
        let client = reqwest::Client::new();

        assert_eq!(get(&client, &base, "/healthz").await, (200, "ok".into()));
        assert_eq!(get(&client, &base, "/readyz").await, (200, "ready".into()));

        // Two data losses: two closed R5 events.
        let mut options = MqttOptions::new("gw-b-test", "127.0.0.1", broker.addr.port());
        options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (gateway, mut eventloop) = AsyncClient::new(options, 16);
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        for b in [batch(1, 2, 0), batch(5, 1, 1234), batch(9, 1, 5)] {
            gateway
                .publish(topics::batch("gw-b"), QoS::AtLeastOnce, false, b.encode())
                .await
                .unwrap();
        }
        timeout(LIMIT, stats.wait_until(|s| s.events_closed == 2 && s.batches_applied == 3))
            .await
            .expect("two events closed");

        let (status, all) = get_json(&client, &base, "/api/v1/events").await;
        assert_eq!(status, 200);
        assert_eq!(all["next_cursor"], Value::Null);
        let events = all["events"].as_array().unwrap();
        assert_eq!(events.len(), 2);
        // Newest first: the second loss, exactly as the events topic has it.
        assert_eq!(
            events[0],
            json!({
                "id": "9b40f9b26646d365826b5b4bfda37ca2",
                "site": "plant",
                "gateway": "gw-b",
                "line": "*",
                "rule": "R5",
                "status": "closed",
                "start": "2022-12-13T18:13:00+08:00",
                "end": "2022-12-13T21:33:00+08:00",
                "duration_secs": 12000,
                "facilities": ["b-fan", "b-stenter"],
                "historical": true,
                "evidence": {},
                "notice": {
                    "en": "Plant: data interruption. Gateway gw-b discarded 5 readings (buffer full) between 2022-12-13 18:13 and 2022-12-13 21:33; 3 batches are missing. These readings cannot be recovered.",
                    "zh": "Plant：工况数据缺失。网关gw-b缓存已满，2022-12-13 18:13至2022-12-13 21:33期间丢弃5条读数，缺失3个批次，无法补传。"
                },
                "samples_dropped": 5,
                "batches_missing": 3,
            })
        );
        assert_eq!(events[1]["id"], "ab546c193452f1a8d800671cc96f0738");
        assert_eq!(events[1]["start"], "2022-12-13T14:53:30+08:00");

        // Pagination: one per page, newest first.
        let (status, first) = get_json(&client, &base, "/api/v1/events?limit=1").await;
        assert_eq!(status, 200);
        assert_eq!(first["events"], json!([events[0]]));
        let cursor = first["next_cursor"].as_str().expect("a next page").to_string();
        let (status, second) =
            get_json(&client, &base, &format!("/api/v1/events?limit=1&cursor={cursor}")).await;
        assert_eq!(status, 200);
        assert_eq!(second, json!({ "events": [events[1]], "next_cursor": null }));

        // Filters.
        let (_, none) = get_json(&client, &base, "/api/v1/events?rule=R1").await;
        assert_eq!(none, json!({ "events": [], "next_cursor": null }));
        let (_, open) = get_json(&client, &base, "/api/v1/events?open=true").await;
        assert_eq!(open["events"], json!([]));
        let (_, from) = get_json(
            &client,
            &base,
            "/api/v1/events?site=plant&line=*&from=2022-12-13T18:00:00%2B08:00",
        )
        .await;
        assert_eq!(from["events"], json!([events[0]]));

        // Bad parameters.
        assert_eq!(
            get_json(&client, &base, "/api/v1/events?from=garbage").await,
            (
                400,
                json!({
                    "error": "from: `garbage` is not an RFC 3339 time (e.g. 2022-12-13T14:53:30+08:00)",
                    "parameter": "from"
                })
            )
        );

        assert_eq!(
            get_json(&client, &base, "/api/v1/sites").await,
            (
                200,
                json!([{
                    "id": "plant",
                    "name": "Plant",
                    "time_zone": "Asia/Shanghai",
                    "gateways": ["gw-b"],
                    "lines": [{ "id": "line-b", "name": "Line B", "facilities": ["b-stenter", "b-fan"] }],
                }])
            )
        );

        let (status, metrics) = get(&client, &base, "/metrics").await;
        assert_eq!(status, 200);
        let lines: Vec<&str> = metrics.lines().collect();
        for expected in [
            "facwatch_ingest_batches_applied_total 3",
            "facwatch_ingest_samples_applied_total 4",
            "facwatch_ingest_events_total{change=\"opened\"} 2",
            "facwatch_ingest_events_total{change=\"closed\"} 2",
            "facwatch_ingest_batches_rejected_total{reason=\"decode\"} 0",
        ] {
            assert!(lines.contains(&expected), "{expected} missing in\n{metrics}");
        }

        shutdown.cancel();
        timeout(LIMIT, task).await.expect("run returned").unwrap().unwrap();
        assert!(
            client.get(format!("{base}/healthz")).send().await.is_err(),
            "the API stops with run"
        );
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn a_taken_http_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = Site::from_toml(SITE, "plant.site.toml").unwrap();
    let mut settings = Settings::new(
        vec![site],
        dir.path().join("ingest.redb"),
        MqttSettings {
            host: "127.0.0.1".into(),
            port: 1,
            client_id: "facwatch-ingest".into(),
        },
    )
    .unwrap();
    settings.http = Some(HttpSettings { listen: addr });
    let result = timeout(
        LIMIT,
        facwatch_ingest::run(
            settings,
            Arc::new(Stats::default()),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("run returned at once");
    let error = result.unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("cannot listen for the HTTP API on {addr}: ")),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_broker_is_unreachable() {
    timeout(LIMIT, async {
        // A port nothing listens on: bound, then released.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let broker_port = free.local_addr().unwrap().port();
        drop(free);
        let dir = tempfile::tempdir().unwrap();
        let site = Site::from_toml(SITE, "plant.site.toml").unwrap();
        let mut settings = Settings::new(
            vec![site],
            dir.path().join("ingest.redb"),
            MqttSettings {
                host: "127.0.0.1".into(),
                port: broker_port,
                client_id: "facwatch-ingest".into(),
            },
        )
        .unwrap();
        settings.http = Some(HttpSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
        });
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(facwatch_ingest::run(
            settings,
            stats.clone(),
            shutdown.clone(),
        ));
        // The API is served before the broker is reached.
        stats
            .wait_until(|s| s.broker_connection_failures >= 1)
            .await;
        let base = format!("http://{}", stats.http_addr().expect("bound"));
        let client = reqwest::Client::new();
        assert_eq!(get(&client, &base, "/healthz").await, (200, "ok".into()));
        assert_eq!(
            get(&client, &base, "/readyz").await,
            (
                503,
                "not ready: the batch subscription at the MQTT broker is not confirmed".into()
            )
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
    })
    .await
    .expect("test finished in time");
}

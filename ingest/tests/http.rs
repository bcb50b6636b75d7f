//! The ingest's HTTP API against a running ingest (embedded broker on port
//! 0, `[http]` on port 0, learnt from `Stats::http_addr`): events as stored,
//! pagination, parameter errors, sites, health, readiness and metrics.
//! Every wait is on a counter or a response, bounded by [`LIMIT`].

mod api;
mod sealing;

use std::sync::Arc;

use facwatch_ingest::broker::{start_embedded, MAX_PACKET_BYTES};
use facwatch_ingest::{HttpSettings, MqttSettings, Settings, Stats};
use facwatch_proto::site::Site;
use facwatch_proto::topics;
use facwatch_proto::wire::{Batch, Quality, Sample, Values};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use api::{get, get_json, FedIngest, LIMIT};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_events_sites_health_and_metrics() {
    timeout(LIMIT * 3, async {
        let broker = start_embedded("127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let site = Site::from_toml(api::ONE_GATEWAY_SITE, "plant.site.toml").unwrap();
        let mut settings = Settings::new(
            vec![site.clone()],
            sealing::keys([&site]),
            dir.path().join("ingest.redb"),
            MqttSettings {
                host: broker.addr.ip().to_string(),
                port: broker.addr.port(),
                client_id: "facwatch-ingest".into(),
            },
        )
        .unwrap();
        settings.http = Some(HttpSettings::open("127.0.0.1:0".parse().unwrap()));
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
                .publish(topics::batch("gw-b"), QoS::AtLeastOnce, false, sealing::sealed(&b))
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
    let site = Site::from_toml(api::ONE_GATEWAY_SITE, "plant.site.toml").unwrap();
    let mut settings = Settings::new(
        vec![site.clone()],
        sealing::keys([&site]),
        dir.path().join("ingest.redb"),
        MqttSettings {
            host: "127.0.0.1".into(),
            port: 1,
            client_id: "facwatch-ingest".into(),
        },
    )
    .unwrap();
    settings.http = Some(HttpSettings::open(addr));
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
        let site = Site::from_toml(api::ONE_GATEWAY_SITE, "plant.site.toml").unwrap();
        let mut settings = Settings::new(
            vec![site.clone()],
            sealing::keys([&site]),
            dir.path().join("ingest.redb"),
            MqttSettings {
                host: "127.0.0.1".into(),
                port: broker_port,
                client_id: "facwatch-ingest".into(),
            },
        )
        .unwrap();
        settings.http = Some(HttpSettings::open("127.0.0.1:0".parse().unwrap()));
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

/// Facility `id` of the plant as the status shows it.
fn facility(
    id: &str,
    name: &str,
    kind: &str,
    role: &str,
    state: &str,
    kw: Value,
    at: Value,
) -> Value {
    json!({
        "id": id,
        "name": name,
        "kind": kind,
        "role": role,
        "state": state,
        "last_power_kw": kw,
        "last_sample_time": at,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_status_shows_facilities_open_events_and_gateways_from_the_store() {
    timeout(LIMIT * 3, async {
        let ingest = FedIngest::start().await;
        let (status, body) = ingest.get_json("/api/v1/sites/plant/status").await;
        assert_eq!(status, 200, "{body}");

        // The open events are those of /api/v1/events, newest first.
        let (_, open) = ingest.get_json("/api/v1/events?site=plant&open=true").await;
        let open = open["events"].as_array().unwrap().clone();
        assert_eq!(
            open.iter().map(|e| e["rule"].as_str().unwrap()).collect::<Vec<_>>(),
            ["R5", "R1"]
        );
        let (gateway_gap, r1) = (open[0].clone(), open[1].clone());
        assert_eq!(
            r1,
            json!({
                "id": "26b46bcde95b2befa22426a99afaa858",
                "site": "plant",
                "gateway": "gw-a",
                "line": "line-a",
                "rule": "R1",
                "status": "open",
                "start": "2022-12-13T14:00:00+08:00",
                "end": null,
                "duration_secs": null,
                "facilities": ["a-fan"],
                "historical": false,
                "evidence": {
                    "a-fan": { "min_kw": 0.0, "avg_kw": 0.0, "max_kw": 0.0 },
                    "a-stenter": { "min_kw": 100.0, "avg_kw": 100.0, "max_kw": 100.0 },
                },
                "notice": {
                    "en": "Plant, Line A: treatment equipment stopped while production ran. The alarm started at 2022-12-13 14:00 and has lasted 10 minutes so far, involving fans. Please check and restore in time.",
                    "zh": "Plant，Line A：生产设施运行期间治污设施停运。报警开始于2022-12-13 14:00，已持续10分钟，涉及风机，请及时检查恢复。"
                },
            })
        );
        assert_eq!(gateway_gap["line"], "*");
        assert_eq!(gateway_gap["gateway"], "gw-a");
        assert_eq!(gateway_gap["start"], "2022-12-13T14:12:00+08:00");

        let at_1412 = json!("2022-12-13T14:12:00+08:00");
        let expected = json!({
            "site": "plant",
            "name": "Plant",
            "time_zone": "Asia/Shanghai",
            "gateways": [
                {
                    "id": "gw-a",
                    "last_seq": 3,
                    // Its meters timed out after 14:12: samples, not readings.
                    "newest_sample_time": "2022-12-13T14:14:00+08:00",
                    "open_events": [gateway_gap],
                },
                {
                    "id": "gw-b",
                    "last_seq": 1,
                    "newest_sample_time": at_1412,
                    "open_events": [],
                },
                // Never sent: no snapshot.
                { "id": "gw-c", "last_seq": null, "newest_sample_time": null, "open_events": [] },
            ],
            "lines": [
                {
                    "id": "line-a",
                    "name": "Line A",
                    "gateway": "gw-a",
                    // Silent past the stale span: unknown, never stopped, and
                    // the last readings stay.
                    "facilities": [
                        facility("a-stenter", "Stenter A", "stenter", "production", "unknown", json!(100.0), at_1412.clone()),
                        facility("a-fan", "Main fan A", "main_fan", "treatment", "unknown", json!(0.0), at_1412.clone()),
                    ],
                    "open_events": [r1],
                },
                {
                    "id": "line-b",
                    "name": "Line B",
                    "gateway": "gw-b",
                    "facilities": [
                        facility("b-stenter", "b-stenter", "stenter", "production", "running", json!(100.0), at_1412.clone()),
                        // 6 kW: above its start threshold, below 40 % of 22 kW.
                        facility("b-fan", "b-fan", "main_fan", "treatment", "low_load", json!(6.0), at_1412.clone()),
                    ],
                    "open_events": [],
                },
                {
                    "id": "line-c",
                    "name": "Line C",
                    "gateway": "gw-c",
                    "facilities": [
                        facility("c-boiler", "c-boiler", "boiler", "production", "unknown", Value::Null, Value::Null),
                        facility("c-fan", "c-fan", "main_fan", "treatment", "unknown", Value::Null, Value::Null),
                    ],
                    "open_events": [],
                },
            ],
        });
        assert_eq!(body, expected);

        // From the store: a new ingest on the same file, fed nothing, shows
        // the same.
        let ingest = ingest.restart().await;
        assert_eq!(ingest.stats.snapshot().batches_applied, 0);
        assert_eq!(
            ingest.get_json("/api/v1/sites/plant/status").await,
            (200, expected)
        );
        ingest.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_status_names_a_bad_site_or_parameter() {
    timeout(LIMIT * 3, async {
        let ingest = FedIngest::start().await;
        assert_eq!(
            ingest.get_json("/api/v1/sites/nowhere/status").await,
            (
                404,
                json!({
                    "error": "site: `nowhere` is not a site of this ingest (see /api/v1/sites)",
                    "parameter": "site"
                })
            )
        );
        assert_eq!(
            ingest.get_json("/api/v1/sites/plant/status?line=line-a").await,
            (
                400,
                json!({
                    "error": "line: is not a parameter (this route takes none)",
                    "parameter": "line"
                })
            )
        );
        assert_eq!(
            ingest.get_json("/api/v1/sites?verbose=1").await,
            (
                400,
                json!({
                    "error": "verbose: is not a parameter (this route takes none)",
                    "parameter": "verbose"
                })
            )
        );
        assert_eq!(
            ingest.get_json("/api/v1/sites/plant").await,
            (
                404,
                json!({
                    "error": "no route GET /api/v1/sites/plant (the routes are in /api/v1/openapi.json)"
                })
            )
        );
        ingest.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_event_changes_by_rule_and_show_outbox_depth() {
    timeout(LIMIT * 3, async {
        let ingest = FedIngest::start().await;
        let (status, metrics) = ingest.get("/metrics").await;
        assert_eq!(status, 200);
        let lines: Vec<&str> = metrics.lines().collect();
        // The three notices wait: the webhook refuses connections.
        assert!(
            lines.contains(&"facwatch_ingest_webhook_outbox_depth{webhook=\"ops\"} 3"),
            "{metrics}"
        );
        // Every rule has both series, with the counters' values.
        let snapshot = ingest.stats.snapshot();
        assert_eq!(snapshot.events_opened_by_rule, [1, 0, 0, 0, 2, 0, 0]);
        assert_eq!(snapshot.events_closed_by_rule, [0, 0, 0, 0, 1, 0, 0]);
        let by_rule: Vec<String> = [
            ("opened", snapshot.events_opened_by_rule),
            ("closed", snapshot.events_closed_by_rule),
        ]
        .iter()
        .flat_map(|(change, counts)| {
            counts.iter().enumerate().map(move |(i, n)| {
                format!(
                    "facwatch_ingest_events_total{{change=\"{change}\",rule=\"R{}\"}} {n}",
                    i + 1
                )
            })
        })
        .collect();
        let rendered: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("facwatch_ingest_events_total"))
            .collect();
        assert_eq!(rendered, by_rule);
        ingest.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_bearer_token_only_the_probes_are_open() {
    const TOKEN: &str = "0123456789abcdef0123456789abcdef-the-token";
    timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let site = Site::from_toml(api::ONE_GATEWAY_SITE, "plant.site.toml").unwrap();
        let mut settings = Settings::new(
            vec![site.clone()],
            sealing::keys([&site]),
            dir.path().join("ingest.redb"),
            // No broker: the API is served from before the connection.
            MqttSettings {
                host: "127.0.0.1".into(),
                port: 1,
                client_id: "facwatch-ingest".into(),
            },
        )
        .unwrap();
        settings.http = Some(HttpSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: Some(TOKEN.into()),
        });
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(facwatch_ingest::run(
            settings,
            stats.clone(),
            shutdown.clone(),
        ));
        let addr = loop {
            if let Some(addr) = stats.http_addr() {
                break addr;
            }
            tokio::task::yield_now().await;
        };
        let client = reqwest::Client::new();
        let get = |path: &str, authorization: Option<String>| {
            let mut request = client.get(format!("http://{addr}{path}"));
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let challenge = response
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, challenge, response.text().await.unwrap())
            }
        };

        assert_eq!(get("/healthz", None).await.0, 200);
        // Not ready (no broker), but not refused either.
        assert_eq!(get("/readyz", None).await.0, 503);
        let refused = [
            ("/api/v1/sites", None),
            ("/metrics", None),
            ("/api/v1/events", Some(format!("Bearer {TOKEN}x"))),
            ("/api/v1/sites", Some("Bearer wrong".to_string())),
            ("/api/v1/sites", Some(format!("Token {TOKEN}"))),
            ("/no/such/route", None),
        ];
        for (path, authorization) in refused {
            let (status, challenge, body) = get(path, authorization.clone()).await;
            assert_eq!(
                (status, challenge.as_deref()),
                (401, Some("Bearer")),
                "{path} {authorization:?}"
            );
            assert!(body.contains("Authorization: Bearer"), "{body}");
            assert!(!body.contains("wrong") && !body.contains(TOKEN), "{body}");
        }
        let bearer = Some(format!("Bearer {TOKEN}"));
        let (status, _, body) = get("/api/v1/sites", bearer.clone()).await;
        assert_eq!(status, 200, "{body}");
        let (status, _, metrics) = get("/metrics", bearer).await;
        assert_eq!(status, 200);
        assert!(
            metrics
                .lines()
                .any(|l| l == "facwatch_ingest_http_unauthorized_total 6"),
            "{metrics}"
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
    })
    .await
    .expect("test finished in time");
}

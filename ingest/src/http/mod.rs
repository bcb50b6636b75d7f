//! The ingest's HTTP API (axum), served by [`crate::run`] while it runs
//! when `[http]` is configured.
//!
//! Routes ([`routes`], the one list the router is built from and the
//! OpenAPI description `ingest/openapi.json` is checked against): `GET
//! /healthz`, `/readyz`, `/metrics`, `/api/v1/sites`,
//! `/api/v1/sites/{site}/status` (see [`status`]), `/api/v1/events` (see
//! [`events`]) and `/api/v1/openapi.json` (that description, as built in).
//! Every request passes a timeout ([`REQUEST_TIMEOUT`], then 408), a
//! concurrency limit ([`MAX_CONCURRENT_REQUESTS`], further requests wait)
//! and a body limit ([`MAX_BODY_BYTES`], then 413). Errors are JSON
//! `{"error": ..., "parameter": ...}`, `parameter` naming the query or path
//! parameter that was wrong; an unknown path is a JSON 404.
//!
//! With a bearer token configured (`[http] token_file`), every request but
//! `/healthz` and `/readyz` (probes carry no secrets) must carry
//! `Authorization: Bearer <token>`, compared in constant time; any other is
//! answered 401 with `WWW-Authenticate: Bearer`, counted, and never logged
//! with what it sent.
//!
//! Invariants: the listener is bound before `run` connects to the broker,
//! and the server has stopped (and dropped its handle on the store) before
//! `run` returns. Handlers only read: store reads run on the blocking pool.

mod events;
mod metrics;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use facwatch_proto::site::Site;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::limit::ConcurrencyLimitLayer;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::warn;

use crate::{Settings, Stats, Store};

pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const MAX_CONCURRENT_REQUESTS: usize = 64;
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the handlers read.
#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) store: Arc<Store>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) sites: Arc<Vec<Arc<Site>>>,
    /// Names of the configured webhooks (their outbox depths are metrics).
    pub(crate) webhooks: Arc<Vec<String>>,
    /// Whether InfluxDB is written (its outbox depth is a metric).
    pub(crate) influx: bool,
    /// The bearer token requests must carry, if any.
    token: Option<Arc<str>>,
}

impl Api {
    pub(crate) fn new(store: Arc<Store>, stats: Arc<Stats>, settings: &Settings) -> Api {
        Api {
            store,
            stats,
            sites: Arc::new(settings.sites.iter().cloned().map(Arc::new).collect()),
            webhooks: Arc::new(settings.webhooks.iter().map(|w| w.name.clone()).collect()),
            influx: settings.influxdb.is_some(),
            token: settings
                .http
                .as_ref()
                .and_then(|h| h.token.as_deref())
                .map(Arc::from),
        }
    }
}

/// The OpenAPI description of [`routes`], checked in beside the crate and
/// served at `/api/v1/openapi.json`; tests keep it true.
pub(crate) const OPENAPI: &str = include_str!("../../openapi.json");

/// One route: its method, its path (axum syntax, `{name}` for a path
/// parameter, which is also OpenAPI's) and its handler. Built only by
/// [`get_route`], so the method is the one the handler answers.
pub(crate) struct Route {
    // Read by the test that checks the OpenAPI description against the
    // routes; the handler's method router answers the method itself.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    handler: MethodRouter<Api>,
}

fn get_route<H, T>(path: &'static str, handler: H) -> Route
where
    H: Handler<T, Api>,
    T: 'static,
{
    Route {
        method: Method::GET,
        path,
        handler: get(handler),
    }
}

/// Every route the API serves.
pub(crate) fn routes() -> Vec<Route> {
    vec![
        get_route("/healthz", healthz),
        get_route("/readyz", readyz),
        get_route("/metrics", metrics),
        get_route("/api/v1/sites", sites),
        get_route("/api/v1/sites/{site}/status", site_status),
        get_route("/api/v1/events", list_events),
        get_route("/api/v1/openapi.json", openapi),
    ]
}

/// Binds `addr` and records the bound address in `stats`.
pub(crate) async fn bind(addr: SocketAddr, stats: &Stats) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    stats.set_http_addr(listener.local_addr()?);
    Ok(listener)
}

/// Serves `api` on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, api: Api, shutdown: CancellationToken) {
    let app = router(api);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(error = %error, "The HTTP API stopped with an error.");
    }
}

fn router(api: Api) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |router, r| router.route(r.path, r.handler))
        .fallback(no_route)
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_token,
        ))
        .with_state(api)
        .layer(
            // Outermost first: the body limit answers 413 itself, the
            // timeout covers waiting for a slot under the concurrency limit.
            ServiceBuilder::new()
                .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    REQUEST_TIMEOUT,
                ))
                .layer(ConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS)),
        )
}

/// Paths served without a token: liveness and readiness probes.
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

async fn require_token(
    State(api): State<Api>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &api.token else {
        return next.run(request).await;
    };
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if presented
        .is_some_and(|p| crate::broker::auth::constant_time_eq(p.as_bytes(), token.as_bytes()))
    {
        return next.run(request).await;
    }
    api.stats.add(|s| &s.api_unauthorized, 1);
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        None,
        "a valid `Authorization: Bearer <token>` header is required",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the store is open (it is, for as long as the API is served)
/// and the batch subscription is confirmed on the current connection.
async fn readyz(State(api): State<Api>) -> Response {
    if api.stats.broker_subscribed() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the batch subscription at the MQTT broker is not confirmed",
        )
            .into_response()
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    let store = api.store.clone();
    let webhooks = api.webhooks.clone();
    let influx = api.influx;
    // An outbox whose depth cannot be read is left out (and logged): the
    // counters are still worth serving.
    let depths = tokio::task::spawn_blocking(move || {
        let influx = influx
            .then(|| match store.influx_outbox_depth() {
                Ok(depth) => Some(depth),
                Err(e) => {
                    warn!(error = %e, "Reading the InfluxDB outbox depth failed.");
                    None
                }
            })
            .flatten();
        let webhooks = webhooks
            .iter()
            .filter_map(|webhook| match store.outbox_len(webhook) {
                Ok(notices) => Some(metrics::OutboxDepth {
                    webhook: webhook.clone(),
                    notices,
                }),
                Err(e) => {
                    warn!(webhook, error = %e, "Reading a webhook outbox depth failed.");
                    None
                }
            })
            .collect::<Vec<_>>();
        (influx, webhooks)
    })
    .await
    .unwrap_or_default();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&api.stats.snapshot(), depths.0, &depths.1),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn no_route(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        None,
        &format!(
            "no route {method} {} (the routes are in /api/v1/openapi.json)",
            uri.path()
        ),
    )
}

async fn site_status(
    State(api): State<Api>,
    site: Result<Path<String>, PathRejection>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let Ok(Path(site)) = site else {
        return error(
            StatusCode::BAD_REQUEST,
            Some("site"),
            "site: is not a valid path segment",
        );
    };
    if let Some(bad) = no_parameters(&pairs) {
        return bad;
    }
    let Some(site) = api.sites.iter().find(|s| s.id == site).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            Some("site"),
            &format!("site: `{site}` is not a site of this ingest (see /api/v1/sites)"),
        );
    };
    let store = api.store.clone();
    let read = {
        let site = site.clone();
        tokio::task::spawn_blocking(move || status::read(&store, &site)).await
    };
    match read {
        Ok(Ok(state)) => Json(status::render(&site, &state)).into_response(),
        Ok(Err(e)) => {
            warn!(site = %site.id, error = %e, "Reading a site status for the HTTP API failed.");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "reading the store failed",
            )
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            "the store read failed",
        ),
    }
}

async fn sites(State(api): State<Api>, Query(pairs): Query<Vec<(String, String)>>) -> Response {
    if let Some(bad) = no_parameters(&pairs) {
        return bad;
    }
    let sites: Vec<_> = api
        .sites
        .iter()
        .map(|site| {
            json!({
                "id": site.id,
                "name": site.name,
                "time_zone": site.time_zone.name(),
                "gateways": site.gateways.iter().map(|g| &g.id).collect::<Vec<_>>(),
                "lines": site.lines.iter().map(|line| json!({
                    "id": line.id,
                    "name": line.name,
                    "facilities": line.facilities.iter().map(|f| &f.id).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(serde_json::Value::Array(sites)).into_response()
}

/// The 400 for a route that takes no query parameters but was given one.
fn no_parameters(pairs: &[(String, String)]) -> Option<Response> {
    pairs.first().map(|(name, _)| {
        error(
            StatusCode::BAD_REQUEST,
            Some(name),
            &format!("{name}: is not a parameter (this route takes none)"),
        )
    })
}

fn error(status: StatusCode, parameter: Option<&str>, problem: &str) -> Response {
    let body = match parameter {
        Some(parameter) => json!({ "error": problem, "parameter": parameter }),
        None => json!({ "error": problem }),
    };
    (status, Json(body)).into_response()
}

async fn list_events(
    State(api): State<Api>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let query = match events::EventQuery::parse(&pairs) {
        Ok(query) => query,
        Err(bad) => {
            let problem = format!("{}: {}", bad.parameter, bad.problem);
            return error(StatusCode::BAD_REQUEST, Some(&bad.parameter), &problem);
        }
    };
    let store = api.store.clone();
    let stored = match tokio::task::spawn_blocking(move || store.events()).await {
        Ok(Ok(stored)) => stored,
        Ok(Err(e)) => {
            warn!(error = %e, "Reading events for the HTTP API failed.");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "reading the store failed",
            );
        }
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "the store read failed",
            )
        }
    };
    let (page, next_cursor) = events::page(stored, &query);
    let events: Vec<_> = page
        .iter()
        .map(|event| {
            let tz = api
                .sites
                .iter()
                .find(|s| s.id == event.site)
                .map_or(chrono_tz::UTC, |s| s.time_zone);
            event.to_json(tz)
        })
        .collect();
    Json(json!({ "events": events, "next_cursor": next_cursor })).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn spec() -> Value {
        serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
    }

    #[test]
    fn the_openapi_description_has_exactly_the_routes() {
        let spec = spec();
        let documented: BTreeSet<(String, String)> = spec["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("a path item")
                    .keys()
                    .map(move |method| (method.to_uppercase(), path.clone()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = routes()
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(documented, served);
    }

    #[test]
    fn documented_path_parameters_are_the_route_templates() {
        for (path, item) in spec()["paths"].as_object().unwrap() {
            let in_template: BTreeSet<&str> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for (method, op) in item.as_object().unwrap() {
                let documented: BTreeSet<&str> = op["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter(|p| p["in"] == "path")
                            .map(|p| {
                                assert_eq!(p["required"], true, "{method} {path}");
                                p["name"].as_str().unwrap()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(documented, in_template, "{method} {path}");
            }
        }
    }

    #[test]
    fn every_ref_in_the_openapi_description_resolves() {
        fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        out.push(r);
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let spec = spec();
        let mut found = Vec::new();
        refs(&spec, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let pointer = r.strip_prefix('#').expect("a local $ref");
            assert!(spec.pointer(pointer).is_some(), "{r} resolves");
        }
    }
}

//! The ingest's HTTP API (axum), served by [`crate::run`] while it runs
//! when `[http]` is configured.
//!
//! Routes: `GET /healthz`, `/readyz`, `/metrics`, `/api/v1/sites`,
//! `/api/v1/events` (see [`events`]). Every request passes a timeout
//! ([`REQUEST_TIMEOUT`], then 408), a concurrency limit
//! ([`MAX_CONCURRENT_REQUESTS`], further requests wait) and a body limit
//! ([`MAX_BODY_BYTES`], then 413).
//!
//! Invariants: the listener is bound before `run` connects to the broker,
//! and the server has stopped (and dropped its handle on the store) before
//! `run` returns. Handlers only read: store reads run on the blocking pool.

mod events;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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

use crate::{Stats, Store};

pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const MAX_CONCURRENT_REQUESTS: usize = 64;
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the handlers read.
#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) store: Arc<Store>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) sites: Arc<Vec<Site>>,
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
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/sites", get(sites))
        .route("/api/v1/events", get(list_events))
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
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&api.stats.snapshot()),
    )
        .into_response()
}

async fn sites(State(api): State<Api>) -> Json<serde_json::Value> {
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
    Json(serde_json::Value::Array(sites))
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

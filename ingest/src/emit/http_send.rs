//! What the ingest's HTTP outputs (webhooks, InfluxDB) share: the client
//! settings, how an answer is judged, and the store calls and pauses of a
//! sender loop.
//!
//! An answer is [`Outcome::Sent`] on 2xx; [`Outcome::Retry`] on a
//! connection error, a timeout, 408, 429 or 5xx (after the seconds of a
//! `Retry-After` header, at most [`MAX_RETRY_AFTER`], when it has one);
//! [`Outcome::Refused`] on anything else (3xx: redirects are not followed,
//! another 4xx), with the first [`BODY_SHOWN_BYTES`] of the body. Error
//! texts never carry the URL: it may hold credentials.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::RETRY_AFTER;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// Bytes of a refusing answer's body kept for the log.
pub(crate) const BODY_SHOWN_BYTES: usize = 200;
/// Longest `Retry-After` honoured.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What one request came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Sent,
    /// Refused for good: drop what was sent.
    Refused {
        status: u16,
        body: String,
    },
    /// Try again after `after` (from `Retry-After`) or the backoff.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

/// A client with `timeout` on connecting and on the whole request, no
/// redirects, and the ingest's user agent.
pub(crate) fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("facwatch-ingest/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends `request` and judges the answer (module doc).
pub(crate) async fn send(request: reqwest::RequestBuilder) -> Outcome {
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            let reason = if error.is_timeout() {
                "timed out".to_string()
            } else {
                format!("{}", error.without_url())
            };
            return Outcome::Retry {
                reason,
                after: None,
            };
        }
    };
    let status = response.status();
    if status.is_success() {
        return Outcome::Sent;
    }
    if matches!(status.as_u16(), 408 | 429) || status.is_server_error() {
        let after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        return Outcome::Retry {
            reason: format!("HTTP {}", status.as_u16()),
            after,
        };
    }
    let mut body = Vec::new();
    while body.len() < BODY_SHOWN_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(BODY_SHOWN_BYTES);
    Outcome::Refused {
        status: status.as_u16(),
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Runs `f` on the store off the async threads (redb commits fsync).
pub(crate) async fn on_store<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Database(Box::new(redb::Error::Io(
            std::io::Error::other(e.to_string()),
        )))),
    }
}

/// Sleeps `wait`; returns whether `shutdown` came first.
pub(crate) async fn pause(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

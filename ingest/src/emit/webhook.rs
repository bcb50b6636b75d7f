//! One sender task per `[[webhooks]]` entry: POSTs the notices of the
//! webhook's on-disk outbox (see `store`) in order, one at a time.
//!
//! A notice leaves the outbox only after a 2xx answer, or when the webhook
//! refuses it for good (a 4xx other than 408 and 429, or a 3xx: counted and
//! logged with the status and the start of the body; see `http_send`). A
//! connection error, a timeout, 408, 429 or 5xx is retried with exponential
//! backoff from `backoff_initial` to `backoff_max`, or after the seconds of
//! a `Retry-After` header. A notice may thus
//! be POSTed more than once (a crash after the answer, before the removal);
//! its `Idempotency-Key` header (`<id>:<phase>`) lets the receiver drop the
//! repeat. The auth header's value is marked sensitive and never logged; the
//! URL is logged without user info or query.

use std::sync::Arc;

use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::http_send::{self, on_store, pause, Outcome};
use super::notice::Notice;
use crate::config::{redacted_url, WebhookSettings};
use crate::stats::{Stats, WebhookCounter};
use crate::store::Store;

/// Header carrying `<id>:<phase>`.
pub(crate) const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// The HTTP client of one webhook.
pub(crate) struct Sender {
    settings: WebhookSettings,
    client: reqwest::Client,
    header: Option<(HeaderName, HeaderValue)>,
}

impl Sender {
    pub(crate) fn new(settings: WebhookSettings) -> Result<Sender, reqwest::Error> {
        let client = http_send::client(settings.timeout)?;
        // Validated by `config`; an invalid one is left out rather than sent.
        let header = settings.header.as_ref().and_then(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            let mut value = HeaderValue::from_str(value).ok()?;
            value.set_sensitive(true);
            Some((name, value))
        });
        Ok(Sender {
            settings,
            client,
            header,
        })
    }

    async fn post(&self, notice: &Notice) -> Outcome {
        let mut request = self
            .client
            .post(self.settings.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_KEY, notice.key.as_str())
            .body(notice.body.clone());
        if let Some((name, value)) = &self.header {
            request = request.header(name.clone(), value.clone());
        }
        http_send::send(request).await
    }
}

/// Sends the webhook's notices until `shutdown` (a POST in flight is
/// finished first, within the webhook's timeout, and its outcome recorded). `outbox_changed` is notified after
/// every commit that queued notices.
pub(crate) async fn run(
    sender: Sender,
    store: Arc<Store>,
    stats: Arc<Stats>,
    outbox_changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let name = sender.settings.name.clone();
    let url = redacted_url(&sender.settings.url);
    let mut backoff = sender.settings.backoff_initial;
    let mut failing = false;
    info!(webhook = %name, url = %url, "Webhook sender started.");
    loop {
        let changed = outbox_changed.notified();
        tokio::pin!(changed);
        // Register before looking, so a notice queued in between wakes us.
        changed.as_mut().enable();
        let head = {
            let name = name.clone();
            on_store(&store, move |s| s.outbox_head(&name)).await
        };
        let queued = match head {
            Ok(Some(queued)) => queued,
            Ok(None) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut changed => continue,
                }
            }
            Err(error) => {
                warn!(webhook = %name, error = %error, "Webhook outbox unreadable; retrying.");
                if pause(sender.settings.backoff_max, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        // A POST in flight is finished even on shutdown (it is bounded by
        // the timeout): abandoning it after the receiver took it would send
        // it again on the next start.
        let outcome = sender.post(&queued.notice).await;
        let wait = match outcome {
            Outcome::Sent => {
                if failing {
                    info!(webhook = %name, url = %url, "Webhook accepts notices again.");
                }
                failing = false;
                backoff = sender.settings.backoff_initial;
                stats.add_webhook(&name, WebhookCounter::Sent, 1);
                None
            }
            Outcome::Refused { status, body } => {
                warn!(
                    webhook = %name,
                    url = %url,
                    key = %queued.notice.key,
                    status,
                    body = %body,
                    "Webhook refused a notice; dropped."
                );
                stats.add_webhook(&name, WebhookCounter::DroppedRefused, 1);
                None
            }
            Outcome::Retry { reason, after } => {
                stats.add_webhook(&name, WebhookCounter::Retries, 1);
                let wait = after.unwrap_or(backoff);
                if failing {
                    debug!(webhook = %name, key = %queued.notice.key, reason, wait_ms = wait.as_millis() as u64, "Webhook POST failed again.");
                } else {
                    warn!(webhook = %name, url = %url, key = %queued.notice.key, reason, wait_ms = wait.as_millis() as u64, "Webhook POST failed; retrying with backoff.");
                }
                failing = true;
                backoff = (backoff * 2).min(sender.settings.backoff_max);
                Some(wait)
            }
        };
        match wait {
            Some(wait) => {
                if pause(wait, &shutdown).await {
                    return;
                }
            }
            None => {
                let number = queued.number;
                let name2 = name.clone();
                if let Err(error) = on_store(&store, move |s| s.outbox_remove(&name2, number)).await
                {
                    // Sent again later, with the same idempotency key.
                    warn!(webhook = %name, error = %error, "Could not remove a sent notice from the outbox.");
                    if pause(sender.settings.backoff_max, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutboxLimit;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    const LIMIT: Duration = Duration::from_secs(20);

    /// What the receiver answers to its n-th request (1-based).
    #[derive(Clone, Copy)]
    enum Answer {
        Status(u16, &'static str, &'static str),
        DropConnection,
    }

    /// One request as the receiver saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Seen {
        attempt: usize,
        key: String,
        auth: Option<String>,
        body: String,
        answered: u16,
    }

    /// A minimal HTTP/1.1 receiver on 127.0.0.1:0 answering by `script`
    /// (then 200), reporting every request.
    async fn receiver(script: Vec<Answer>) -> (reqwest::Url, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (tx, attempts, script) = (tx.clone(), attempts.clone(), script.clone());
                tokio::spawn(async move {
                    let mut socket = BufReader::new(socket);
                    loop {
                        let mut headers = Vec::new();
                        loop {
                            let mut line = String::new();
                            match socket.read_line(&mut line).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            if line == "\r\n" {
                                break;
                            }
                            headers.push(line.trim_end().to_string());
                        }
                        let header = |name: &str| {
                            headers.iter().find_map(|h| {
                                let (n, v) = h.split_once(':')?;
                                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                            })
                        };
                        let length: usize = header("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0; length];
                        if socket.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let attempt =
                            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        let answer = script
                            .get(attempt - 1)
                            .copied()
                            .unwrap_or(Answer::Status(200, "", ""));
                        let answered = match answer {
                            Answer::DropConnection => 0,
                            Answer::Status(status, _, _) => status,
                        };
                        let _ = tx.send(Seen {
                            attempt,
                            key: header("idempotency-key").unwrap_or_default(),
                            auth: header("authorization"),
                            body: String::from_utf8_lossy(&body).into_owned(),
                            answered,
                        });
                        match answer {
                            Answer::DropConnection => return,
                            Answer::Status(status, extra, text) => {
                                let response = format!(
                                    "HTTP/1.1 {status} X\r\n{extra}content-length: {}\r\n\r\n{text}",
                                    text.len()
                                );
                                if socket
                                    .get_mut()
                                    .write_all(response.as_bytes())
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        (url, rx)
    }

    fn settings(url: reqwest::Url) -> WebhookSettings {
        WebhookSettings {
            name: "ops".into(),
            url,
            timeout: Duration::from_secs(5),
            header: Some(("Authorization".into(), "Bearer s3cret".into())),
            max_queue: 100,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
        }
    }

    fn limits() -> Vec<OutboxLimit> {
        vec![OutboxLimit {
            webhook: "ops".into(),
            max_queue: 100,
        }]
    }

    fn notice(n: u32) -> Notice {
        Notice {
            key: format!("event-{n}:open"),
            body: format!("{{\"n\":{n}}}").into_bytes(),
        }
    }

    struct Running {
        shutdown: CancellationToken,
        /// What the apply task notifies after a commit that queued notices.
        changed: Arc<Notify>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(url: &reqwest::Url, store: &Arc<Store>, stats: &Arc<Stats>) -> Running {
        let shutdown = CancellationToken::new();
        let changed = Arc::new(Notify::new());
        let task = tokio::spawn(run(
            Sender::new(settings(url.clone())).unwrap(),
            store.clone(),
            stats.clone(),
            changed.clone(),
            shutdown.clone(),
        ));
        Running {
            shutdown,
            changed,
            task,
        }
    }

    impl Running {
        async fn stop(self) {
            self.shutdown.cancel();
            timeout(LIMIT, self.task).await.unwrap().unwrap();
        }
    }

    async fn next(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
        timeout(LIMIT, seen.recv()).await.unwrap().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_notice_arrives_once_in_order_through_failures_and_restarts() {
        let (url, mut seen) = receiver(vec![
            Answer::Status(500, "", "oops"),
            Answer::DropConnection,
            Answer::Status(429, "retry-after: 1\r\n", ""),
        ])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.redb");
        let stats = Arc::new(Stats::default());
        let store = Arc::new(Store::open(&path).unwrap());
        for n in 1..=3 {
            store.enqueue(&notice(n), &limits()).unwrap();
        }

        // First run: a 500, then a dropped connection; stopped after that.
        let sender = start(&url, &store, &stats);
        let first = next(&mut seen).await;
        let second = next(&mut seen).await;
        timeout(LIMIT, stats.wait_until(|s| s.webhook_retries == 2))
            .await
            .unwrap();
        sender.stop().await;
        assert_eq!((first.answered, second.answered), (500, 0));
        assert_eq!(store.outbox_len("ops").unwrap(), 3);

        // Restart with the store reopened: a 429 with Retry-After: 1, then
        // everything goes through.
        drop(store);
        let store = Arc::new(Store::open(&path).unwrap());
        let started = tokio::time::Instant::now();
        let sender = start(&url, &store, &stats);
        let mut later = Vec::new();
        for _ in 0..4 {
            later.push(next(&mut seen).await);
        }
        timeout(LIMIT, stats.wait_until(|s| s.webhook_sent == 3))
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "Retry-After honoured"
        );
        sender.stop().await;

        let all: Vec<Seen> = [first, second].into_iter().chain(later).collect();
        let attempts: Vec<(usize, &str, u16)> = all
            .iter()
            .map(|s| (s.attempt, s.key.as_str(), s.answered))
            .collect();
        assert_eq!(
            attempts,
            vec![
                (1, "event-1:open", 500),
                (2, "event-1:open", 0),
                (3, "event-1:open", 429),
                (4, "event-1:open", 200),
                (5, "event-2:open", 200),
                (6, "event-3:open", 200),
            ]
        );
        let delivered: Vec<&str> = all
            .iter()
            .filter(|s| s.answered == 200)
            .map(|s| s.body.as_str())
            .collect();
        assert_eq!(delivered, vec!["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
        assert!(all
            .iter()
            .all(|s| s.auth.as_deref() == Some("Bearer s3cret")));
        assert_eq!(store.outbox_len("ops").unwrap(), 0);
        assert_eq!(
            stats.webhook("ops"),
            crate::WebhookSnapshot {
                queued: 0,
                sent: 3,
                retries: 3,
                dropped_full: 0,
                dropped_refused: 0,
            }
        );
        assert!(seen.try_recv().is_err(), "nothing sent twice");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_notice_is_dropped_and_the_next_one_sent() {
        let (url, mut seen) = receiver(vec![Answer::Status(
            400,
            "",
            "field `n` is not allowed here",
        )])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let store = Arc::new(Store::open(&dir.path().join("ingest.redb")).unwrap());
        store.enqueue(&notice(1), &limits()).unwrap();
        let sender = start(&url, &store, &stats);
        // Queued while the sender runs, and notified as the apply task
        // does (without the notification the test would race the sender:
        // done with the first before the second is queued, it waits).
        store.enqueue(&notice(2), &limits()).unwrap();
        sender.changed.notify_one();
        let first = next(&mut seen).await;
        let second = next(&mut seen).await;
        timeout(LIMIT, stats.wait_until(|s| s.webhook_sent == 1))
            .await
            .unwrap();
        sender.stop().await;
        assert_eq!(
            (
                first.key.as_str(),
                first.answered,
                second.key.as_str(),
                second.answered
            ),
            ("event-1:open", 400, "event-2:open", 200)
        );
        assert_eq!(stats.webhook("ops").dropped_refused, 1);
        assert_eq!(store.outbox_len("ops").unwrap(), 0);
    }
}

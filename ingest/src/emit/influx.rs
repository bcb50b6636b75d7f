//! InfluxDB output: readings and events as line protocol (built with
//! `influxdb-line-protocol`), queued in the store's outbox and POSTed to
//! `<url>/api/v2/write` by one writer task.
//!
//! **Points commit with what they record.** A group's transaction
//! (`Store::commit_group`) queues, for every applied batch, the batch itself
//! (its postcard encoding: one `reading` line per sample, rendered when it is
//! written) and the `event` line of every event change. So a point is queued
//! if and only if its batch is applied: exactly once, whatever crashes,
//! since a batch is applied exactly once. Queuing the compact batch and
//! rendering in the writer keeps the apply path at its own speed (the
//! rendering, about a microsecond a sample, runs beside it, and the outbox
//! holds about 64 bytes a sample instead of about 290). While the outbox
//! holds `max_outbox_bytes` the apply task applies no batch
//! (`receive::apply`): the gateways are not acked and keep the data.
//!
//! The writer sends the outbox in order: one request is the oldest entries,
//! at least one, and more while they stay within `max_lines_per_write`
//! lines, of one timestamp precision. Entries leave the outbox only after a
//! 2xx answer, or when the server refuses them for good (a 4xx other than
//! 408 and 429: the lines are counted as refused and logged with the first
//! offending line). A connection error, a timeout, 408, 429 or 5xx is
//! retried with exponential backoff, or after the seconds of `Retry-After`.
//! A point is therefore written more than once only when the ingest dies
//! (or the store fails) between a 2xx answer and the removal; InfluxDB
//! overwrites a point with the same series and time, so that repeat
//! changes nothing there.
//!
//! Readings are rendered with the site files loaded when they are written:
//! a meter moved to another line between queuing and writing is tagged
//! with its new line. [`Renderer`] builds each meter's measurement and tag
//! set once with the builder and writes the fields itself, in the
//! builder's formats; a test holds it byte for byte to the builder's
//! output.
//!
//! Names (also in the README): measurement `reading`, tags `site`,
//! `gateway`, `line` and `facility` (when the meter measures a facility),
//! `meter`, `quality` (`ok`, `timeout`, `exception`, `decode_error`,
//! `offline`); fields `ok` (bool, always), `power_kw`, `energy_kwh`,
//! `voltage_a_v` .. `voltage_c_v`, `current_a_a` .. `current_c_a`,
//! `power_factor` (each when the meter gave it), `exception_code`
//! (integer, for exceptions); time: the sample's acquisition time.
//! Measurement `event`, tags `site`, `gateway`, `line`, `rule`; fields
//! `open` (bool), `duration_secs` (integer, once closed),
//! `samples_dropped` and `batches_missing` (integers, for a loss the
//! gateway declared), `facilities` (integer: how many), `historical`
//! (bool), `id` (string); time: the event's start, so each change of an
//! event overwrites the previous one in InfluxDB.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;

use facwatch_proto::site::Site;
use facwatch_proto::wire::{Batch, Quality, Sample};
use influxdb_line_protocol::LineProtocolBuilder;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::http_send::{self, Outcome};
use crate::config::{redacted_url, InfluxSettings, Precision};
use crate::detect::{Event, EventStatus};
use crate::stats::Stats;
use crate::store::{InfluxHead, Store};

pub(crate) const READING: &str = "reading";
pub(crate) const EVENT: &str = "event";

/// What the apply path queues, taken from [`InfluxSettings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rendering {
    pub(crate) precision: Precision,
    pub(crate) readings: bool,
    pub(crate) events: bool,
    /// Most lines in one entry of event lines.
    pub(crate) max_lines: usize,
}

impl Rendering {
    pub(crate) fn of(settings: &InfluxSettings) -> Rendering {
        Rendering {
            precision: settings.precision,
            readings: settings.readings,
            events: settings.events,
            max_lines: settings.max_lines_per_write,
        }
    }
}

/// What an outbox entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Content {
    /// Line protocol: whole lines, each ending in `\n`.
    Lines,
    /// Applied batches, each as its length (u32, little-endian) and its
    /// encoding (`Batch::encode`): one `reading` line per sample.
    Batches,
}

/// Most bytes reserved up front for one entry of batches.
const MAX_ENTRY_RESERVE: usize = 4 * 1024 * 1024;

/// One outbox entry before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) content: Content,
    pub(crate) lines: u32,
    pub(crate) data: Vec<u8>,
}

/// The entries one commit queues, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) entries: Vec<Entry>,
}

impl Pending {
    /// Queues the readings of an applied batch (`payload`: the bytes it was
    /// decoded from, if at hand, else it is encoded again): in the last
    /// entry of batches while its lines stay within `max_lines`, else in a
    /// new one (one store entry per batch would cost a B-tree insert each).
    pub(crate) fn push_batch(&mut self, batch: &Batch, payload: Option<&[u8]>, max_lines: usize) {
        if batch.samples.is_empty() {
            return;
        }
        let lines = batch.samples.len() as u32;
        let fits = self.entries.last().is_some_and(|last| {
            last.content == Content::Batches && (last.lines + lines) as usize <= max_lines
        });
        if !fits {
            // Sized for `max_lines` samples like this batch's: growing by
            // doubling would copy the entry several times over.
            let per_sample = payload.map_or(80, |p| p.len() / lines as usize + 1);
            let capacity = (per_sample + 1) * max_lines.max(lines as usize);
            self.entries.push(Entry {
                content: Content::Batches,
                lines: 0,
                data: Vec::with_capacity(capacity.min(MAX_ENTRY_RESERVE)),
            });
        }
        let entry = self.entries.last_mut().expect("just ensured");
        let encoded;
        let bytes = match payload {
            Some(payload) => payload,
            None => {
                encoded = batch.encode();
                &encoded
            }
        };
        entry
            .data
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        entry.data.extend_from_slice(bytes);
        entry.lines += lines;
    }

    /// The entry of lines the next line goes to: the last one if it holds
    /// lines and has room, else a new one.
    fn lines_entry(&mut self, max_lines: usize) -> &mut Entry {
        let open = self.entries.last().is_some_and(|last| {
            last.content == Content::Lines && (last.lines as usize) < max_lines
        });
        if !open {
            self.entries.push(Entry {
                content: Content::Lines,
                lines: 0,
                data: Vec::new(),
            });
        }
        self.entries.last_mut().expect("just ensured")
    }

    pub(crate) fn lines(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.lines)).sum()
    }
}

/// For each meter of a site: the line and facility it measures.
#[derive(Debug, Default)]
pub(crate) struct MeterIndex {
    by_meter: HashMap<String, (String, String)>,
}

impl MeterIndex {
    pub(crate) fn of(site: &Site) -> MeterIndex {
        let by_meter = site
            .lines
            .iter()
            .flat_map(|line| {
                line.facilities
                    .iter()
                    .map(move |f| (f.meter.clone(), (line.id.clone(), f.id.clone())))
            })
            .collect();
        MeterIndex { by_meter }
    }
}

/// Field names of the three phases' voltages and currents.
const VOLTAGES: [&str; 3] = ["voltage_a_v", "voltage_b_v", "voltage_c_v"];
const CURRENTS: [&str; 3] = ["current_a_a", "current_b_a", "current_c_a"];

/// The `quality` tag of a sample.
fn quality_tag(quality: Quality) -> &'static str {
    match quality {
        Quality::Exception(_) => "exception",
        other => other.as_str(),
    }
}

/// Index of a quality tag in a meter's prefixes.
fn quality_index(quality: Quality) -> usize {
    match quality {
        Quality::Ok => 0,
        Quality::Timeout => 1,
        Quality::Exception(_) => 2,
        Quality::DecodeError => 3,
        Quality::Offline => 4,
    }
}

/// A meter's measurement and tag set for each quality ([`quality_index`]),
/// built when first needed.
type Prefixes = [Option<Vec<u8>>; 5];

/// Renders `reading` lines. Per gateway, meter and quality it keeps the
/// measurement and tag set, escaped by the builder once; per sample it
/// writes the fields and timestamp in the builder's formats.
pub(crate) struct Renderer {
    /// Gateway -> its site and the site's meters.
    sites: HashMap<String, (Arc<Site>, Arc<MeterIndex>)>,
    /// Gateway -> meter -> the prefix for each quality.
    prefixes: HashMap<String, HashMap<String, Prefixes>>,
}

impl Renderer {
    pub(crate) fn new(sites: &[Site]) -> Renderer {
        let mut by_gateway = HashMap::new();
        for site in sites {
            let site = Arc::new(site.clone());
            let meters = Arc::new(MeterIndex::of(&site));
            for gateway in &site.gateways {
                by_gateway.insert(gateway.id.clone(), (site.clone(), meters.clone()));
            }
        }
        Renderer {
            sites: by_gateway,
            prefixes: HashMap::new(),
        }
    }

    /// Appends one `reading` line per sample of `batch` to `out`.
    pub(crate) fn render_batch(&mut self, batch: &Batch, precision: Precision, out: &mut Vec<u8>) {
        for sample in &batch.samples {
            self.render_sample(&batch.gateway, sample, precision, out);
        }
    }

    fn render_sample(
        &mut self,
        gateway: &str,
        sample: &Sample,
        precision: Precision,
        out: &mut Vec<u8>,
    ) {
        let prefix = self.prefix(gateway, &sample.meter, sample.quality);
        out.extend_from_slice(prefix);
        // The builder's field formats: `{}` for floats and bools, `{}i`
        // for integers, `,` between fields, ` ` before the first field and
        // the timestamp.
        let _ = write!(out, " ok={}", sample.quality == Quality::Ok);
        let values = &sample.values;
        // Line protocol has no NaN or infinity: such a value is left out.
        let float32 = |out: &mut Vec<u8>, name: &str, value: Option<f32>| {
            if let Some(v) = value.filter(|v| v.is_finite()) {
                let _ = write!(out, ",{name}={v}");
            }
        };
        float32(out, "power_kw", values.power_kw);
        if let Some(v) = values.energy_kwh.filter(|v| v.is_finite()) {
            let _ = write!(out, ",energy_kwh={v}");
        }
        for (name, v) in VOLTAGES.iter().zip(&values.voltage_v) {
            float32(out, name, Some(*v));
        }
        for (name, v) in CURRENTS.iter().zip(&values.current_a) {
            float32(out, name, Some(*v));
        }
        float32(out, "power_factor", values.power_factor);
        if let Quality::Exception(code) = sample.quality {
            let _ = write!(out, ",exception_code={code}i");
        }
        let _ = writeln!(out, " {}", precision.from_unix_ms(sample.time_ms));
    }

    /// The measurement and tag set of a sample of `meter` of `gateway` with
    /// `quality`, built once.
    fn prefix(&mut self, gateway: &str, meter: &str, quality: Quality) -> &[u8] {
        let index = quality_index(quality);
        let cached = self
            .prefixes
            .get(gateway)
            .and_then(|m| m.get(meter))
            .is_some_and(|p| p[index].is_some());
        if !cached {
            let built = self.build_prefix(gateway, meter, quality);
            let slots = self
                .prefixes
                .entry(gateway.to_string())
                .or_default()
                .entry(meter.to_string())
                .or_default();
            slots[index] = Some(built);
        }
        self.prefixes[gateway][meter][index]
            .as_deref()
            .expect("just built")
    }

    fn build_prefix(&self, gateway: &str, meter: &str, quality: Quality) -> Vec<u8> {
        let (site, meters) = match self.sites.get(gateway) {
            Some((site, meters)) => (Some(site.id.as_str()), meters.by_meter.get(meter)),
            // A gateway no loaded site has any more: tagged with what the
            // batch says.
            None => (None, None),
        };
        let line = LineProtocolBuilder::new().measurement(READING);
        let line = match meters {
            Some((line_id, facility)) => line
                .tag("facility", facility)
                .tag("gateway", gateway)
                .tag("line", line_id)
                .tag("meter", meter),
            None => line.tag("gateway", gateway).tag("meter", meter),
        };
        let line = line.tag("quality", quality_tag(quality));
        let line = match site {
            Some(site) => line.tag("site", site),
            None => line,
        };
        // The builder needs a field to close a line; the prefix is what
        // comes before it.
        const PROBE: &[u8] = b" x=0i\n";
        let mut built = line.field("x", 0i64).close_line().build();
        debug_assert!(built.ends_with(PROBE));
        built.truncate(built.len() - PROBE.len());
        built
    }
}

/// Appends the `event` line of one event change to `out`.
pub(crate) fn push_event(out: &mut Pending, rendering: &Rendering, event: &Event) {
    let entry = out.lines_entry(rendering.max_lines);
    let mut line = LineProtocolBuilder::new_with(&mut entry.data)
        .measurement(EVENT)
        .tag("gateway", &event.gateway)
        .tag("line", &event.line)
        .tag("rule", event.rule.as_str())
        .tag("site", &event.site)
        .field("open", event.status == EventStatus::Open);
    if let Some(secs) = event.duration_secs() {
        line = line.field("duration_secs", secs);
    }
    if let Some(loss) = &event.data_loss {
        line = line
            .field("samples_dropped", loss.samples_dropped as i64)
            .field("batches_missing", loss.batches_missing as i64);
    }
    line.field("facilities", event.facilities.len() as i64)
        .field("historical", event.historical)
        .field("id", event.id.as_str())
        .timestamp(rendering.precision.from_unix_ms(event.start_ms))
        .close_line();
    entry.lines += 1;
}

/// The request body of `head`: its lines, the batches rendered. Batches
/// that do not decode (a store written by another build) are left out and
/// counted in the returned number.
pub(crate) fn body(renderer: &mut Renderer, head: &InfluxHead) -> (Vec<u8>, u64) {
    let mut body = Vec::with_capacity(head.lines as usize * 300);
    let mut undecodable = 0;
    for (content, data) in &head.entries {
        match content {
            Content::Lines => body.extend_from_slice(data),
            Content::Batches => {
                let mut rest = data.as_slice();
                while !rest.is_empty() {
                    let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                        undecodable += 1;
                        break;
                    };
                    let len = u32::from_le_bytes(*len) as usize;
                    let Some((encoded, tail)) = tail.split_at_checked(len) else {
                        undecodable += 1;
                        break;
                    };
                    match Batch::decode(encoded) {
                        Ok(batch) => renderer.render_batch(&batch, head.precision, &mut body),
                        Err(_) => undecodable += 1,
                    }
                    rest = tail;
                }
            }
        }
    }
    (body, undecodable)
}

/// The InfluxDB writer's HTTP client.
pub(crate) struct Writer {
    settings: InfluxSettings,
    client: reqwest::Client,
}

impl Writer {
    pub(crate) fn new(settings: InfluxSettings) -> Result<Writer, reqwest::Error> {
        let client = http_send::client(settings.timeout)?;
        Ok(Writer { settings, client })
    }

    async fn post(&self, body: &[u8], precision: Precision) -> Outcome {
        let mut request = self
            .client
            .post(self.settings.write_url(precision))
            .header(CONTENT_TYPE, "text/plain; charset=utf-8");
        if let Some(token) = &self.settings.token {
            let mut value = match reqwest::header::HeaderValue::from_str(&format!("Token {token}"))
            {
                Ok(value) => value,
                // Checked by `config`; never reached.
                Err(_) => {
                    return Outcome::Refused {
                        status: 0,
                        body: "the token is not a valid header value".into(),
                    }
                }
            };
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        request = if self.settings.gzip {
            request.header(CONTENT_ENCODING, "gzip").body(gzip(body))
        } else {
            request.body(body.to_vec())
        };
        http_send::send(request).await
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

/// The line a refusal names (`line 3` in InfluxDB's and VictoriaMetrics'
/// messages, counted from 1), else the request's first line; at most
/// [`http_send::BODY_SHOWN_BYTES`].
pub(crate) fn offending_line<'a>(body: &str, lines: &'a [u8]) -> std::borrow::Cow<'a, str> {
    let number = body
        .match_indices("line ")
        .find_map(|(at, _)| {
            let digits: String = body[at + 5..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<usize>().ok()
        })
        .filter(|n| *n >= 1);
    let mut all = lines.split(|b| *b == b'\n');
    let line = number
        .and_then(|n| lines.split(|b| *b == b'\n').nth(n - 1))
        .or_else(|| all.next())
        .unwrap_or_default();
    let shown = &line[..line.len().min(http_send::BODY_SHOWN_BYTES)];
    String::from_utf8_lossy(shown)
}

/// Writes the outbox until `shutdown` (a request in flight is finished
/// first, within the timeout, and its outcome recorded). `outbox_changed`
/// is notified after every commit that queued lines.
pub(crate) async fn run(
    writer: Writer,
    mut renderer: Renderer,
    store: Arc<Store>,
    stats: Arc<Stats>,
    outbox_changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let url = redacted_url(&writer.settings.url);
    let max_lines = writer.settings.max_lines_per_write;
    let mut backoff = writer.settings.backoff_initial;
    let mut failing = false;
    info!(url = %url, bucket = %writer.settings.bucket, "InfluxDB writer started.");
    loop {
        let changed = outbox_changed.notified();
        tokio::pin!(changed);
        // Register before looking, so lines queued in between wake us.
        changed.as_mut().enable();
        let head = http_send::on_store(&store, move |s| s.influx_head(max_lines)).await;
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut changed => continue,
                }
            }
            Err(error) => {
                warn!(error = %error, "InfluxDB outbox unreadable; retrying.");
                if http_send::pause(writer.settings.backoff_max, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        // Rendering is CPU work of about a microsecond a line: off the
        // async threads.
        let rendered = tokio::task::spawn_blocking(move || {
            let (body, undecodable) = body(&mut renderer, &head);
            (body, undecodable, renderer, head)
        })
        .await;
        let (body, undecodable, head) = match rendered {
            Ok((body, undecodable, back, head)) => {
                renderer = back;
                (body, undecodable, head)
            }
            Err(error) => {
                // Only a panic in rendering gets here: stop writing rather
                // than lose the outbox; it is sent after a restart.
                tracing::error!(error = %error, "Rendering InfluxDB lines failed; the writer stops.");
                return;
            }
        };
        if undecodable > 0 {
            warn!(
                batches = undecodable,
                "Batches in the InfluxDB outbox do not decode; their readings are dropped."
            );
        }
        let outcome = writer.post(&body, head.precision).await;
        let wait = match outcome {
            Outcome::Sent => {
                if failing {
                    info!(url = %url, "InfluxDB accepts writes again.");
                }
                failing = false;
                backoff = writer.settings.backoff_initial;
                stats.add(|s| &s.influx_lines_written, head.lines);
                stats.add(|s| &s.influx_requests, 1);
                None
            }
            Outcome::Refused {
                status,
                body: body_text,
            } => {
                let line = offending_line(&body_text, &body);
                warn!(
                    url = %url,
                    status,
                    body = %body_text,
                    lines = head.lines,
                    first_offending_line = %line,
                    "InfluxDB refused a write; its lines are dropped."
                );
                stats.add(|s| &s.influx_lines_refused, head.lines);
                stats.add(|s| &s.influx_write_errors, 1);
                None
            }
            Outcome::Retry { reason, after } => {
                stats.add(|s| &s.influx_write_errors, 1);
                let wait = after.unwrap_or(backoff);
                if failing {
                    debug!(
                        reason,
                        wait_ms = wait.as_millis() as u64,
                        "InfluxDB write failed again."
                    );
                } else {
                    warn!(url = %url, reason, wait_ms = wait.as_millis() as u64, "InfluxDB write failed; retrying with backoff.");
                }
                failing = true;
                backoff = (backoff * 2).min(writer.settings.backoff_max);
                Some(wait)
            }
        };
        match wait {
            Some(wait) => {
                if http_send::pause(wait, &shutdown).await {
                    return;
                }
            }
            None => {
                let through = head.last;
                match http_send::on_store(&store, move |s| s.influx_remove(through)).await {
                    Ok(()) => {}
                    Err(error) => {
                        // Written again later: InfluxDB overwrites the same points.
                        warn!(error = %error, "Could not remove written lines from the InfluxDB outbox.");
                        if http_send::pause(writer.settings.backoff_max, &shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Rule;
    use facwatch_proto::wire::Values;
    use influxdb_line_protocol::builder::FieldValue;
    use proptest::prelude::*;

    fn site() -> Site {
        Site::from_toml(
            include_str!("../../../deploy/stenter-plant.site.toml"),
            "stenter-plant.site.toml",
        )
        .unwrap()
    }

    const MS: Rendering = Rendering {
        precision: Precision::Milliseconds,
        readings: true,
        events: true,
        max_lines: 2,
    };

    fn batch(gateway: &str, samples: Vec<Sample>) -> Batch {
        Batch {
            gateway: gateway.into(),
            seq: 1,
            dropped_before: 0,
            samples,
        }
    }

    fn rendered(renderer: &mut Renderer, batch: &Batch, precision: Precision) -> String {
        let mut out = Vec::new();
        renderer.render_batch(batch, precision, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn readings_carry_tags_in_key_order_and_every_value() {
        let site = site();
        let samples = vec![
            Sample {
                meter: "l1-stenter".into(),
                time_ms: 1_670_911_380_000,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(110.5),
                    energy_kwh: Some(12_345.25),
                    voltage_v: vec![230.1, 229.9, 231.0],
                    current_a: vec![180.2, 179.8, 181.0],
                    power_factor: Some(0.85),
                },
            },
            Sample {
                meter: "l1-main-fan".into(),
                time_ms: 1_670_911_380_001,
                quality: Quality::Exception(4),
                values: Values::default(),
            },
            Sample {
                meter: "not-in-a-line".into(),
                time_ms: 1_670_911_380_002,
                quality: Quality::Ok,
                values: Values {
                    power_kw: Some(f32::NAN),
                    ..Values::default()
                },
            },
        ];
        let mut renderer = Renderer::new(std::slice::from_ref(&site));
        let gateway = &site.gateways[0].id;
        assert_eq!(
            rendered(&mut renderer, &batch(gateway, samples), Precision::Milliseconds),
            "reading,facility=l1-stenter,gateway=gw-01,line=line1,meter=l1-stenter,quality=ok,site=tx-dyeing \
             ok=true,power_kw=110.5,energy_kwh=12345.25,voltage_a_v=230.1,voltage_b_v=229.9,voltage_c_v=231,\
             current_a_a=180.2,current_b_a=179.8,current_c_a=181,power_factor=0.85 1670911380000\n\
             reading,facility=l1-main-fan,gateway=gw-01,line=line1,meter=l1-main-fan,quality=exception,site=tx-dyeing \
             ok=false,exception_code=4i 1670911380001\n\
             reading,gateway=gw-01,meter=not-in-a-line,quality=ok,site=tx-dyeing ok=true 1670911380002\n"
        );
        // A gateway no site has: no site, line or facility tags.
        let lost = batch(
            "gw-gone",
            vec![Sample {
                meter: "l1-stenter".into(),
                time_ms: 5,
                quality: Quality::Offline,
                values: Values::default(),
            }],
        );
        assert_eq!(
            rendered(&mut renderer, &lost, Precision::Milliseconds),
            "reading,gateway=gw-gone,meter=l1-stenter,quality=offline ok=false 5\n"
        );
    }

    #[test]
    fn precision_scales_the_timestamp() {
        let site = site();
        let mut renderer = Renderer::new(std::slice::from_ref(&site));
        let one = batch(
            &site.gateways[0].id,
            vec![Sample {
                meter: "l1-stenter".into(),
                time_ms: 1_670_911_380_999,
                quality: Quality::Timeout,
                values: Values::default(),
            }],
        );
        let mut stamp = |precision| {
            let line = rendered(&mut renderer, &one, precision);
            line.trim_end().rsplit_once(' ').unwrap().1.to_string()
        };
        assert_eq!(stamp(Precision::Seconds), "1670911380");
        assert_eq!(stamp(Precision::Milliseconds), "1670911380999");
        assert_eq!(stamp(Precision::Microseconds), "1670911380999000");
        assert_eq!(stamp(Precision::Nanoseconds), "1670911380999000000");
    }

    /// An `f32` as the builder's `FieldValue` would write it, for the
    /// reference below.
    struct Float32(f32);

    impl FieldValue for Float32 {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)
        }
    }

    /// A reading line built wholly by the builder: what [`Renderer`] must
    /// write, byte for byte.
    fn reference_line(
        site: &Site,
        gateway: &str,
        sample: &Sample,
        precision: Precision,
    ) -> Vec<u8> {
        let meters = MeterIndex::of(site);
        let line = LineProtocolBuilder::new().measurement(READING);
        let line = match meters.by_meter.get(&sample.meter) {
            Some((line_id, facility)) => line
                .tag("facility", facility)
                .tag("gateway", gateway)
                .tag("line", line_id)
                .tag("meter", &sample.meter),
            None => line.tag("gateway", gateway).tag("meter", &sample.meter),
        };
        let mut line = line
            .tag("quality", quality_tag(sample.quality))
            .tag("site", &site.id)
            .field("ok", sample.quality == Quality::Ok);
        let values = &sample.values;
        let finite = |v: f32| v.is_finite().then_some(Float32(v));
        if let Some(v) = values.power_kw.and_then(finite) {
            line = line.field("power_kw", v);
        }
        if let Some(v) = values.energy_kwh.filter(|v| v.is_finite()) {
            line = line.field("energy_kwh", v);
        }
        for (name, v) in VOLTAGES.iter().zip(&values.voltage_v) {
            if let Some(v) = finite(*v) {
                line = line.field(name, v);
            }
        }
        for (name, v) in CURRENTS.iter().zip(&values.current_a) {
            if let Some(v) = finite(*v) {
                line = line.field(name, v);
            }
        }
        if let Some(v) = values.power_factor.and_then(finite) {
            line = line.field("power_factor", v);
        }
        if let Quality::Exception(code) = sample.quality {
            line = line.field("exception_code", i64::from(code));
        }
        line.timestamp(precision.from_unix_ms(sample.time_ms))
            .close_line()
            .build()
    }

    fn any_quality() -> impl Strategy<Value = Quality> {
        prop_oneof![
            Just(Quality::Ok),
            Just(Quality::Timeout),
            any::<u8>().prop_map(Quality::Exception),
            Just(Quality::DecodeError),
            Just(Quality::Offline),
        ]
    }

    fn any_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            any::<f32>(),
            -1000.0f32..1000.0,
            Just(f32::NAN),
            Just(f32::INFINITY)
        ]
    }

    proptest! {
        #[test]
        fn the_renderer_writes_the_builders_bytes(
            // Meter ids with the characters line protocol escapes.
            meter in prop_oneof![Just("l1-stenter".to_string()), "[a-z ,=\\\\\"]{1,8}"],
            gateway in prop_oneof![Just("gw-01".to_string()), "[a-z ,=]{1,6}"],
            quality in any_quality(),
            power in proptest::option::of(any_f32()),
            energy in proptest::option::of(any::<f64>()),
            phases in proptest::collection::vec(any_f32(), 0..4),
            pf in proptest::option::of(any_f32()),
            time_ms in 0i64..4_000_000_000_000,
            precision in prop_oneof![Just(Precision::Seconds), Just(Precision::Milliseconds), Just(Precision::Nanoseconds)],
        ) {
            let mut site = site();
            site.gateways[0].id = gateway.clone();
            let sample = Sample {
                meter,
                time_ms,
                quality,
                values: Values {
                    power_kw: power,
                    energy_kwh: energy,
                    voltage_v: phases.clone(),
                    current_a: phases,
                    power_factor: pf,
                },
            };
            let mut renderer = Renderer::new(std::slice::from_ref(&site));
            let mut out = Vec::new();
            renderer.render_batch(&batch(&gateway, vec![sample.clone()]), precision, &mut out);
            // Twice: the second from the cached prefix.
            let first = out.clone();
            out.clear();
            renderer.render_batch(&batch(&gateway, vec![sample.clone()]), precision, &mut out);
            let reference = reference_line(&site, &gateway, &sample, precision);
            prop_assert_eq!(String::from_utf8_lossy(&first), String::from_utf8_lossy(&reference));
            prop_assert_eq!(out, reference);
        }
    }

    #[test]
    fn event_lines_share_entries_up_to_the_limit_and_follow_batches_in_order() {
        let event = Event {
            id: "ab12".into(),
            site: "plant".into(),
            gateway: "gw 1".into(),
            line: "line1".into(),
            rule: Rule::R1,
            status: EventStatus::Closed,
            start_ms: 1_670_911_382_880,
            end_ms: Some(1_670_913_002_880),
            facilities: vec!["a".into(), "b".into(), "c".into()],
            historical: true,
            notice_en: String::new(),
            notice_zh: String::new(),
            data_loss: None,
            evidence: Default::default(),
        };
        let one = |time_ms| {
            batch(
                "gw 1",
                vec![Sample {
                    meter: "m".into(),
                    time_ms,
                    quality: Quality::Ok,
                    values: Values::default(),
                }],
            )
        };
        let mut out = Pending::default();
        push_event(&mut out, &MS, &event);
        // Two batches of one sample share an entry of MS.max_lines (2).
        out.push_batch(&one(1), None, MS.max_lines);
        out.push_batch(&one(2), Some(&one(2).encode()), MS.max_lines);
        out.push_batch(&one(3), None, MS.max_lines);
        push_event(&mut out, &MS, &event);
        push_event(&mut out, &MS, &event);
        push_event(&mut out, &MS, &event);
        let line =
            "event,gateway=gw\\ 1,line=line1,rule=R1,site=plant open=false,duration_secs=1620i,\
                    facilities=3i,historical=true,id=\"ab12\" 1670911382880\n";
        let shape: Vec<(Content, u32)> = out.entries.iter().map(|e| (e.content, e.lines)).collect();
        assert_eq!(
            shape,
            [
                (Content::Lines, 1),
                (Content::Batches, 2),
                (Content::Batches, 1),
                (Content::Lines, 2),
                (Content::Lines, 1)
            ]
        );
        assert_eq!(out.entries[0].data, line.as_bytes());
        assert_eq!(out.entries[3].data, line.repeat(2).as_bytes());
        assert_eq!(out.lines(), 7);

        // As the writer sends them: the batches rendered in order between
        // the event lines.
        let head = InfluxHead {
            last: 4,
            precision: Precision::Milliseconds,
            lines: out.lines(),
            entries: out
                .entries
                .iter()
                .map(|e| (e.content, e.data.clone()))
                .collect(),
        };
        let mut renderer = Renderer::new(&[]);
        let (text, undecodable) = body(&mut renderer, &head);
        let reading = |t| format!("reading,gateway=gw\\ 1,meter=m,quality=ok ok=true {t}\n");
        assert_eq!(
            String::from_utf8(text).unwrap(),
            format!(
                "{line}{}{}{}{}",
                reading(1),
                reading(2),
                reading(3),
                line.repeat(3)
            )
        );
        assert_eq!(undecodable, 0);

        // A truncated entry renders what decodes and counts the rest.
        let mut broken = head.clone();
        broken.entries[1].1.truncate(6);
        assert_eq!(body(&mut renderer, &broken).1, 1);
    }

    #[test]
    fn the_offending_line_is_the_one_the_server_names_else_the_first() {
        let lines = b"a 1\nb 2\nc 3\n";
        assert_eq!(
            offending_line("unable to parse line 2: bad field", lines),
            "b 2"
        );
        assert_eq!(
            offending_line("partial write: field type conflict", lines),
            "a 1"
        );
        assert_eq!(offending_line("line 99: out of range", lines), "a 1");
    }
}

//! InfluxDB output: readings and events as line protocol (built with
//! `influxdb-line-protocol`), queued in the store's outbox and POSTed to
//! `<url>/api/v2/write` by one writer task.
//!
//! **Points commit with what they record.** The lines of a group of batches
//! (one `reading` per applied sample, one `event` per event change) are
//! rendered while the group is applied and written to the outbox in the
//! group's own transaction (`Store::commit_group`). So a point is queued if
//! and only if its batch is applied: exactly once, whatever crashes, since a
//! batch is applied exactly once. While the outbox holds
//! `max_outbox_bytes` the apply task applies no batch (`receive::apply`):
//! the gateways are not acked and keep the data.
//!
//! The writer sends the outbox in order: one request is the oldest entries,
//! up to `max_lines_per_write` lines, of one timestamp precision. Entries
//! leave the outbox only after a 2xx answer, or when the server refuses them
//! for good (a 4xx other than 408 and 429: the lines are counted as refused
//! and logged with the first offending line). A connection error, a timeout,
//! 408, 429 or 5xx is retried with exponential backoff, or after the seconds
//! of `Retry-After`. A point is therefore written more than once only when
//! the ingest dies (or the store fails) between a 2xx answer and the
//! removal; InfluxDB overwrites a point with the same series and time, so
//! that repeat changes nothing there.
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
//! (bool), `id` (string);
//! time: the event's start, so each change of an event overwrites the
//! previous one in InfluxDB.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::sync::Arc;

use facwatch_proto::site::Site;
use facwatch_proto::wire::{Quality, Sample};
use influxdb_line_protocol::builder::FieldValue;
use influxdb_line_protocol::LineProtocolBuilder;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::http_send::{self, Outcome};
use crate::config::{redacted_url, InfluxSettings, Precision};
use crate::detect::{Event, EventStatus};
use crate::stats::Stats;
use crate::store::{InfluxWrite, Store};

pub(crate) const READING: &str = "reading";
pub(crate) const EVENT: &str = "event";

/// What the apply path renders, taken from [`InfluxSettings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rendering {
    pub(crate) precision: Precision,
    pub(crate) readings: bool,
    pub(crate) events: bool,
    /// Most lines in one outbox entry (and so, at least, in one request).
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

/// Line protocol cut into entries of at most `max_lines` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Chunks {
    pub(crate) entries: Vec<Chunk>,
}

/// One outbox entry: whole lines, each ending in `\n`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) lines: u32,
    pub(crate) text: Vec<u8>,
}

impl Chunks {
    /// The entry the next line goes to: the last one, or a new one when it
    /// has `max_lines`.
    fn open_entry(&mut self, max_lines: usize) -> &mut Chunk {
        let full = self
            .entries
            .last()
            .is_none_or(|last| last.lines as usize >= max_lines);
        if full {
            self.entries.push(Chunk::default());
        }
        self.entries.last_mut().expect("just ensured")
    }

    pub(crate) fn lines(&self) -> u64 {
        self.entries.iter().map(|c| u64::from(c.lines)).sum()
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

/// An `f32` written with the shortest decimal that reads back as the same
/// `f32` (`0.85`, not `0.8500000238418579`).
struct Float32(f32);

impl FieldValue for Float32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Appends one `reading` line per sample of `gateway` to `out`.
pub(crate) fn push_readings(
    out: &mut Chunks,
    rendering: &Rendering,
    site: &Site,
    meters: &MeterIndex,
    gateway: &str,
    samples: &[Sample],
) {
    for sample in samples {
        let entry = out.open_entry(rendering.max_lines);
        reading_line(
            &mut entry.text,
            rendering.precision,
            site,
            meters,
            gateway,
            sample,
        );
        entry.lines += 1;
    }
}

/// Field names of the three phases' voltages and currents.
const VOLTAGES: [&str; 3] = ["voltage_a_v", "voltage_b_v", "voltage_c_v"];
const CURRENTS: [&str; 3] = ["current_a_a", "current_b_a", "current_c_a"];

fn reading_line(
    out: &mut Vec<u8>,
    precision: Precision,
    site: &Site,
    meters: &MeterIndex,
    gateway: &str,
    sample: &Sample,
) {
    let quality = match sample.quality {
        Quality::Exception(_) => "exception",
        other => other.as_str(),
    };
    // Tags in key order, as InfluxDB stores them.
    let line = LineProtocolBuilder::new_with(out).measurement(READING);
    let line = match meters.by_meter.get(&sample.meter) {
        Some((line_id, facility)) => line
            .tag("facility", facility)
            .tag("gateway", gateway)
            .tag("line", line_id)
            .tag("meter", &sample.meter),
        None => line.tag("gateway", gateway).tag("meter", &sample.meter),
    };
    let mut line = line
        .tag("quality", quality)
        .tag("site", &site.id)
        .field("ok", sample.quality == Quality::Ok);
    let values = &sample.values;
    // Line protocol has no NaN or infinity: such a value is left out.
    let finite32 = |v: Option<f32>| v.filter(|v| v.is_finite()).map(Float32);
    if let Some(v) = finite32(values.power_kw) {
        line = line.field("power_kw", v);
    }
    if let Some(v) = values.energy_kwh.filter(|v| v.is_finite()) {
        line = line.field("energy_kwh", v);
    }
    for (name, v) in VOLTAGES.iter().zip(&values.voltage_v) {
        if let Some(v) = finite32(Some(*v)) {
            line = line.field(name, v);
        }
    }
    for (name, v) in CURRENTS.iter().zip(&values.current_a) {
        if let Some(v) = finite32(Some(*v)) {
            line = line.field(name, v);
        }
    }
    if let Some(v) = finite32(values.power_factor) {
        line = line.field("power_factor", v);
    }
    if let Quality::Exception(code) = sample.quality {
        line = line.field("exception_code", i64::from(code));
    }
    line.timestamp(precision.from_unix_ms(sample.time_ms))
        .close_line();
}

/// Appends the `event` line of one event change to `out`.
pub(crate) fn push_event(out: &mut Chunks, rendering: &Rendering, event: &Event) {
    let entry = out.open_entry(rendering.max_lines);
    let mut line = LineProtocolBuilder::new_with(&mut entry.text)
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

    async fn post(&self, write: &InfluxWrite) -> Outcome {
        let mut request = self
            .client
            .post(self.settings.write_url(write.precision))
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
            request
                .header(CONTENT_ENCODING, "gzip")
                .body(gzip(&write.body))
        } else {
            request.body(write.body.clone())
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
        let write = match head {
            Ok(Some(write)) => write,
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
        let outcome = writer.post(&write).await;
        let wait = match outcome {
            Outcome::Sent => {
                if failing {
                    info!(url = %url, "InfluxDB accepts writes again.");
                }
                failing = false;
                backoff = writer.settings.backoff_initial;
                stats.add(|s| &s.influx_lines_written, write.lines);
                stats.add(|s| &s.influx_requests, 1);
                None
            }
            Outcome::Refused { status, body } => {
                let line = offending_line(&body, &write.body);
                warn!(
                    url = %url,
                    status,
                    body = %body,
                    lines = write.lines,
                    first_offending_line = %line,
                    "InfluxDB refused a write; its lines are dropped."
                );
                stats.add(|s| &s.influx_lines_refused, write.lines);
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
                let through = write.last;
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

    fn text(chunks: &Chunks) -> Vec<String> {
        chunks
            .entries
            .iter()
            .map(|c| String::from_utf8(c.text.clone()).unwrap())
            .collect()
    }

    #[test]
    fn readings_carry_tags_in_key_order_every_value_and_whole_lines_per_entry() {
        let site = site();
        let meters = MeterIndex::of(&site);
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
        let mut out = Chunks::default();
        push_readings(&mut out, &MS, &site, &meters, "gw-1", &samples);
        assert_eq!(
            text(&out),
            vec![
                "reading,facility=l1-stenter,gateway=gw-1,line=line1,meter=l1-stenter,quality=ok,site=tx-dyeing \
                 ok=true,power_kw=110.5,energy_kwh=12345.25,voltage_a_v=230.1,voltage_b_v=229.9,voltage_c_v=231,\
                 current_a_a=180.2,current_b_a=179.8,current_c_a=181,power_factor=0.85 1670911380000\n\
                 reading,facility=l1-main-fan,gateway=gw-1,line=line1,meter=l1-main-fan,quality=exception,site=tx-dyeing \
                 ok=false,exception_code=4i 1670911380001\n",
                "reading,gateway=gw-1,meter=not-in-a-line,quality=ok,site=tx-dyeing ok=true 1670911380002\n",
            ]
        );
        assert_eq!((out.lines(), out.entries[0].lines), (3, 2));
    }

    #[test]
    fn precision_scales_the_timestamp() {
        let site = site();
        let sample = Sample {
            meter: "l1-stenter".into(),
            time_ms: 1_670_911_380_999,
            quality: Quality::Timeout,
            values: Values::default(),
        };
        let stamp = |precision| {
            let mut out = Chunks::default();
            let rendering = Rendering { precision, ..MS };
            push_readings(
                &mut out,
                &rendering,
                &site,
                &MeterIndex::of(&site),
                "g",
                std::slice::from_ref(&sample),
            );
            let line = String::from_utf8(out.entries[0].text.clone()).unwrap();
            line.trim_end().rsplit_once(' ').unwrap().1.to_string()
        };
        assert_eq!(stamp(Precision::Seconds), "1670911380");
        assert_eq!(stamp(Precision::Milliseconds), "1670911380999");
        assert_eq!(stamp(Precision::Microseconds), "1670911380999000");
        assert_eq!(stamp(Precision::Nanoseconds), "1670911380999000000");
    }

    #[test]
    fn an_event_line_is_keyed_by_its_start_and_says_whether_it_is_open() {
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
        let mut out = Chunks::default();
        push_event(&mut out, &MS, &event);
        assert_eq!(
            text(&out),
            vec![
                "event,gateway=gw\\ 1,line=line1,rule=R1,site=plant open=false,duration_secs=1620i,\
                 facilities=3i,historical=true,id=\"ab12\" 1670911382880\n"
            ]
        );
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

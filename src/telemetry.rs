//! Logging: one subscriber for the process, a root span per request with its id, and an access
//! line per request. Paths are logged without their query string, where `?key=` may sit.

use std::ops::Deref;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Span, Subscriber};
use tracing_actix_web::{RequestId, RootSpanBuilder};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Dependencies log at `warn` unless `RUST_LOG` says otherwise:
/// their debug output is not written for us and could echo request data.
pub fn init(settings: &LogSettings) -> crate::log_sink::FlushGuard {
    // `Targets` rather than `EnvFilter`: it filters by target and level only (RUST_LOG's
    // `target=level,...` form), without the per-span bookkeeping EnvFilter does on every span
    // enter and exit, which the request path pays several times a call.
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .or_else(|| format!("warn,switchyard={}", settings.level).parse().ok())
        .unwrap_or_else(|| {
            Targets::new()
                .with_default(Level::WARN)
                .with_target("switchyard", Level::INFO)
        });
    // Lines are appended to a buffer that a writer thread empties every few milliseconds.
    let (writer, guard) = crate::log_sink::batched_stdout();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
        LogFormat::Text if ansi => registry.with(layer).try_init(),
        LogFormat::Text => registry
            .with(layer.event_format(PlainText).fmt_fields(PlainFields))
            .try_init(),
    };
    if result.is_err() {
        eprintln!("a tracing subscriber was already installed; keeping it");
    }
    guard
}

/// Fields as tracing-subscriber's default formatter writes them without colour (`name=value`,
/// the message bare, the `log.*` fields of bridged `log` records left out), minus its styling
/// layer: the request span's fields are formatted when the span opens and again at every
/// record, so that layer cost every call several times.
struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> std::fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'w> {
    writer: Writer<'w>,
    result: std::fmt::Result,
    first: bool,
}

impl PlainVisitor<'_> {
    /// Writes the separator and `name=` (nothing for the message), or returns false when the
    /// field is not written (an earlier write failed, or a `log.*` field).
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        let space = !std::mem::take(&mut self.first);
        if name == "message" {
            if space {
                self.result = self.writer.write_char(' ');
            }
            return self.result.is_ok();
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        // ` name=` in one write: each write is a call through the writer's `dyn` interface,
        // and every field of every request line pays for it.
        let mut buffer = [b' '; 64];
        let (at, end) = (usize::from(space), usize::from(space) + name.len() + 1);
        self.result = match buffer.get_mut(at..end) {
            Some(room) => {
                room[..name.len()].copy_from_slice(name.as_bytes());
                room[name.len()] = b'=';
                let text = std::str::from_utf8(&buffer[..end]).expect("a field name is text");
                self.writer.write_str(text)
            }
            None => (if space {
                self.writer.write_char(' ')
            } else {
                Ok(())
            })
            .and_then(|()| self.writer.write_str(name))
            .and_then(|()| self.writer.write_char('=')),
        };
        self.result.is_ok()
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if self.start(field) {
                self.result = self.writer.write_str(value);
            }
            return;
        }
        // As logfmt writes values: a word (an id, a path, a model name) bare, anything with a
        // space or a quote in it quoted as `Debug` quotes it. The request span's ids are
        // recorded as text rather than `%display` values, which go through the formatting
        // machinery and cost several times more.
        if is_word(value) {
            if self.start(field) {
                self.result = self.writer.write_str(value);
            }
            return;
        }
        let plain = value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        if !plain {
            return self.record_debug(field, &value);
        }
        if self.start(field) {
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.start(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// Whether a value is written bare: not empty, and only letters, digits and `-_.:/@+`.
fn is_word(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| WORD_BYTES[usize::from(b)])
}

/// The bytes of a bare word, as a table: ids are checked a byte at a time on every call.
static WORD_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = matches!(byte as u8,
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' | b'/' | b'@' | b'+');
        byte += 1;
    }
    table
};

/// Text lines as tracing-subscriber's default format writes them without colour
/// (`<time> <LEVEL> span{fields}: message fields`), minus its styling layer, which costs a
/// measurable share of the request path even when every style is empty.
struct PlainText;

impl<S, N> FormatEvent<S, N> for PlainText
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write_now(&mut writer)?;
        let level = match *event.metadata().level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        };
        writer.write_str(level)?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.name())?;
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
            writer.write_char(' ')?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// Writes the time now as tracing-subscriber's `SystemTime` does (RFC 3339 in UTC, to the
/// microsecond: `2026-11-25T08:12:54.123456Z`). The date and time to the second are formatted
/// once a second per thread and reused: formatting them on every line cost more than the rest
/// of the timestamp.
fn write_now(writer: &mut Writer<'_>) -> std::fmt::Result {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != now.as_secs() {
            *second = now.as_secs();
            text.clear();
            let at = chrono::DateTime::from_timestamp(now.as_secs() as i64, 0).unwrap_or_default();
            use std::fmt::Write;
            write!(text, "{}", at.format("%Y-%m-%dT%H:%M:%S"))?;
        }
        writer.write_str(text)?;
        let micros = now.subsec_micros();
        let mut fraction = *b".000000Z";
        for (place, digit) in fraction[1..7].iter_mut().rev().enumerate() {
            *digit = b'0' + (micros / 10u32.pow(place as u32) % 10) as u8;
        }
        writer.write_str(std::str::from_utf8(&fraction).expect("ASCII digits"))
    })
}

/// The root span of every request: method, path (never the query), request id, the caller once
/// authenticated, and for proxied calls the model asked and sent, the level, the attempts and
/// the upstream key that answered (its id, never its secret).
pub struct RequestSpan;

impl RootSpanBuilder for RequestSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let request_id = request_id_of(request);
        let request_id = request_id.as_ref().map_or("", RequestIdText::as_str);
        tracing::info_span!(
            target: "switchyard::http",
            "request",
            method = request.method().as_str(),
            path = request.path(),
            request_id,
            user_id = tracing::field::Empty,
            key_id = tracing::field::Empty,
            model = tracing::field::Empty,
            upstream_model = tracing::field::Empty,
            level = tracing::field::Empty,
            attempts = tracing::field::Empty,
            upstream_key_id = tracing::field::Empty,
        )
    }

    // The status is on the access line, which is written inside this span.
    fn on_request_end<B: MessageBody>(_: Span, _: &Result<ServiceResponse<B>, Error>) {}
}

/// Records several fields of a span in one call: each `Span::record` is a separate trip through
/// the subscriber (a registry lookup and a re-format), and the request path records often.
/// Names the span does not declare are ignored, as `Span::record` ignores them.
pub fn record<const N: usize>(span: &Span, values: [(&str, &dyn tracing::Value); N]) {
    let Some(metadata) = span.metadata() else {
        return;
    };
    let fields = metadata.fields();
    let resolved = values.map(|(name, _)| fields.field(name));
    if resolved.iter().any(Option::is_none) {
        debug_assert!(false, "recording a field the span does not declare");
        return;
    }
    let pairs: [(&Field, Option<&dyn tracing::Value>); N] = std::array::from_fn(|i| {
        let field = resolved[i].as_ref().expect("checked above");
        (field, Some(values[i].1))
    });
    span.record_all(&fields.value_set(&pairs));
}

/// A request id as text: a hyphenated UUID, written straight into place (the span, the
/// response header and the metering record each want it, on every call).
pub struct RequestIdText([u8; uuid::fmt::Hyphenated::LENGTH]);

impl RequestIdText {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a hyphenated UUID is ASCII")
    }
}

/// The id tracing-actix-web gave the request, as text.
pub fn request_id_of(req: &impl HttpMessage) -> Option<RequestIdText> {
    let id = *req.extensions().get::<RequestId>()?.deref();
    let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut text);
    Some(RequestIdText(text))
}

static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Sets `x-request-id` on every response and writes one access line per request.
pub async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let request_id = request_id_of(&req);
    // Handlers and middleware turn their errors into responses, so an `Err` here is rare; it
    // is still logged with its latency before actix renders it.
    let mut response = next.call(req).await.inspect_err(|err| {
        let latency_us = started.elapsed().as_micros() as u64;
        tracing::warn!(target: "switchyard::http", error = %err, latency_us, "request failed");
    })?;
    if let Some(value) = request_id.and_then(|id| HeaderValue::from_str(id.as_str()).ok()) {
        response
            .headers_mut()
            .insert(REQUEST_ID_HEADER.clone(), value);
    }
    let status = response.status().as_u16();
    let latency_us = started.elapsed().as_micros() as u64;
    if status >= 500 {
        tracing::warn!(target: "switchyard::http", status, latency_us, "request failed");
    } else {
        tracing::info!(target: "switchyard::http", status, latency_us, "request");
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Lines written by the plain text format, for a test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_text_lines_read_like_the_default_format_with_words_bare() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .event_format(PlainText)
                .fmt_fields(PlainFields),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                path = "/v1/models",
                model = tracing::field::Empty,
                upstream_model = tracing::field::Empty,
                attempts = tracing::field::Empty
            );
            record(
                &span,
                [
                    ("model", &"gpt\"4"),
                    ("upstream_model", &"gpt 4"),
                    ("attempts", &2),
                ],
            );
            let _entered = span.enter();
            tracing::info!(status = 200, r#type = "x", empty = "", "request");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line = text.lines().next().unwrap();
        assert!(
            line.ends_with(
                "  INFO request{path=/v1/models model=\"gpt\\\"4\" upstream_model=\"gpt 4\" attempts=2}: request status=200 type=x empty=\"\""
            ),
            "{line}"
        );
    }

    #[test]
    fn line_times_are_rfc3339_to_the_microsecond_as_the_default_timer_writes_them() {
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        for _ in 0..3 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            write_now(&mut Writer::new(&mut ours)).unwrap();
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} {theirs}");
            let ours = chrono::DateTime::parse_from_rfc3339(&ours).unwrap();
            let theirs = chrono::DateTime::parse_from_rfc3339(&theirs).unwrap();
            assert!((theirs - ours).num_milliseconds().abs() < 1_000);
        }
    }
}

//! Relaying an upstream answer: chunk by chunk as it arrives, with an idle timeout, the
//! client's model name restored when a mapping changed it, the usage event removed when the
//! client did not ask for it, and an error event (never a normal end) when a stream breaks.
//! Every chunk is shown to the call's meter as the provider sent it.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, CACHE_CONTROL, CONTENT_TYPE};
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpResponse;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

use super::affinity::{first_id, ResponseAffinity, ID_WITHIN};
use super::dialect::Dialect;
use super::failover::UpstreamResponse;
use super::translate;
use super::Call;
use crate::domain::Provider;
use crate::error::ApiError;
use crate::metering::meter::CallMeter;

/// Largest non-streamed body read whole to restore a mapped model name.
const MAX_REWRITE_BODY: usize = 64 * 1024 * 1024;

/// Non-streamed answers of up to this declared length are read whole before the response goes
/// out; larger ones (images, audio) are relayed as they arrive.
const WHOLE_BODY_BYTES: u64 = 64 * 1024;

/// Response headers passed on from the provider; the rest (its rate limits, cookies, ids)
/// describe the upstream key, not the caller's call.
const PASSED_HEADERS: [HeaderName; 2] = [CONTENT_TYPE, CACHE_CONTROL];

/// Where the id of a stored response goes: noted with the key that created it.
pub struct NoteId {
    pub affinity: Arc<ResponseAffinity>,
    pub key_id: String,
}

impl NoteId {
    fn note(&self, id: &str) {
        self.affinity.remember(id, &self.key_id);
    }
}

/// Looks for a stored response's id in the first [`ID_WITHIN`] bytes of its answer.
struct IdWatch {
    note: NoteId,
    start: Vec<u8>,
}

impl IdWatch {
    fn new(note: NoteId) -> Self {
        IdWatch {
            note,
            start: Vec::new(),
        }
    }

    /// Takes a chunk; says whether the watch is over (the id noted, or not in the start).
    fn observe(&mut self, chunk: &[u8]) -> bool {
        // The id is nearly always in the first chunk: found there without a copy.
        let text = if self.start.is_empty() {
            chunk
        } else {
            let room = ID_WITHIN.saturating_sub(self.start.len());
            self.start
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
            &self.start
        };
        if let Some(id) = first_id(text) {
            self.note.note(id);
            return true;
        }
        if self.start.is_empty() {
            self.start
                .extend_from_slice(&chunk[..chunk.len().min(ID_WITHIN)]);
        }
        self.start.len() >= ID_WITHIN
    }
}

/// Builds the client's response from the upstream's; `note_id` notes a stored response's id.
pub async fn respond(
    upstream: UpstreamResponse,
    read: Option<Bytes>,
    call: &Call,
    idle: Duration,
    mut meter: CallMeter,
    note_id: Option<NoteId>,
    translated: Option<Provider>,
) -> Result<HttpResponse, ApiError> {
    let mut response = HttpResponse::build(upstream.status());
    for name in &PASSED_HEADERS {
        if let Some(value) = upstream.headers().get(name) {
            response.insert_header((name.clone(), value.clone()));
        }
    }
    let content_type = upstream
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let is_sse = has_prefix(content_type, "text/event-stream");
    let is_json = has_prefix(content_type, "application/json");
    if upstream.status().is_client_error() && !is_json {
        // An error page from something in front of the provider (a proxy's HTML 404 or 413):
        // the client gets the contract's JSON error with the same status, never the page. A
        // plain-text error keeps its words (the start of them).
        let status = upstream.status();
        meter.begin(status.as_u16(), false, false);
        let kind = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        // The body is read once: by failover when small (see `read_small`), else here.
        let said = match (kind.as_str(), read) {
            ("text/plain", Some(body)) => Some(plain_words(&body)),
            ("text/plain", None) => read_whole(upstream, idle, 64 * 1024, None)
                .await
                .ok()
                .map(|body| plain_words(&body)),
            _ => None,
        };
        let message = match (kind.as_str(), said) {
            (_, Some(words)) if !words.is_empty() => {
                format!("the upstream answered {}: {words}", status.as_u16())
            }
            ("", _) => format!(
                "the upstream answered {} with no content type, not an API error",
                status.as_u16()
            ),
            (kind, _) => format!(
                "the upstream answered {} with a {kind} body, not an API error",
                status.as_u16()
            ),
        };
        let error = ApiError::new(status, "upstream_error", message);
        meter.end(true);
        meter.refused(&error);
        return Err(error);
    }
    if is_sse {
        response.insert_header((CACHE_CONTROL, "no-cache"));
    }
    if let Some(provider) = translated {
        let answer = Translation {
            provider,
            is_sse,
            read,
        };
        // Boxed: its state would otherwise grow every call's future, which is moved whole
        // (memcpy) more than once before it first runs.
        return Box::pin(answer.respond(upstream, response, call, idle, meter)).await;
    }
    meter.begin(upstream.status().as_u16(), is_sse, is_text(&upstream));
    // Only a JSON answer names its model; audio, images and subtitles stream as they come.
    let rename: Option<String> = call.mapped.is_some().then(|| call.model.clone());
    let length = declared_length(&upstream);
    // A small answer failover read already (see `read_small`), so that a body that stalled
    // or broke moved the call to the next key: sent whole with its length, it costs less than
    // relaying chunk by chunk.
    if let Some(body) = &read {
        answer_read(body, &mut meter, &note_id);
    }
    match (rename, is_sse, read) {
        // A whole JSON answer: restore the model name the client asked for (a Gemini stream
        // sent as one JSON array is relayed as it arrives, below).
        (Some(model), false, read) if is_json && (read.is_some() || !call.stream) => {
            let body = match read {
                Some(body) => body,
                None => read_answer(upstream, idle, MAX_REWRITE_BODY, &mut meter, &note_id).await?,
            };
            match rename_model_in_json(&body, &model) {
                Some(renamed) => Ok(response.body(renamed)),
                // Not JSON at all, though it says so: there is no model name to restore.
                None => {
                    let error = body_failed("it is not whole JSON (cut short on the way?)");
                    meter.end(false);
                    meter.refused(&error);
                    Err(error)
                }
            }
        }
        (_, _, Some(body)) => Ok(response.body(body)),
        // A Gemini stream sent as one JSON array: each object gets the asked name.
        (Some(model), false, None) if is_json && call.stream => {
            let framing = EventFraming::Array(ArrayRewriter::new(model));
            let body = relay_stream(
                upstream,
                idle,
                Some(framing),
                None,
                None,
                meter,
                call.dialect,
            );
            Ok(response.streaming(body))
        }
        (_, false, None) => {
            // A larger answer of known size: relayed as it arrives, keeping its length so the
            // client gets a plain (not chunked) body.
            let watch = note_id.map(IdWatch::new);
            let body = relay_stream(upstream, idle, None, None, watch, meter, call.dialect);
            Ok(match length {
                Some(length) => response.body(actix_web::body::SizedStream::new(length, body)),
                None => response.streaming(body),
            })
        }
        (rename, true, None) => {
            let framing = match rename.is_some() || call.hide_usage {
                true => EventFraming::Rewrite(SseRewriter::new(rename, call.hide_usage)),
                false => EventFraming::Lines(WholeLines::default()),
            };
            // awc reports a connection lost mid-body as a normal end, so a stream whose last
            // event never came is the tell: `data: [DONE]` for chat and text completions, the
            // final `response.*` event for responses.
            let done = DoneWatcher::for_path(&call.path);
            let watch = note_id.map(IdWatch::new);
            let body = relay_stream(
                upstream,
                idle,
                Some(framing),
                done,
                watch,
                meter,
                call.dialect,
            );
            Ok(response.streaming(body))
        }
    }
}

/// An answer from a provider the call was translated for, going back in OpenAI's shape.
struct Translation {
    provider: Provider,
    is_sse: bool,
    /// The body, when failover read it.
    read: Option<Bytes>,
}

impl Translation {
    async fn respond(
        self,
        upstream: UpstreamResponse,
        mut response: actix_web::HttpResponseBuilder,
        call: &Call,
        idle: Duration,
        mut meter: CallMeter,
    ) -> Result<HttpResponse, ApiError> {
        let status = upstream.status();
        meter.begin(status.as_u16(), self.is_sse, true);
        if self.is_sse && status.is_success() {
            // The translated stream always ends with its usage: removed unless asked for.
            let framing = match call.usage_asked {
                true => EventFraming::Lines(WholeLines::default()),
                false => EventFraming::Rewrite(SseRewriter::new(None, true)),
            };
            let events = translate::events(self.provider, upstream, &call.model);
            let done = DoneWatcher::for_path("/chat/completions");
            let body = relay_stream(
                events,
                idle,
                Some(framing),
                done,
                None,
                meter,
                Dialect::OpenAi,
            );
            return Ok(response.streaming(body));
        }
        let body = match self.read {
            Some(body) => body,
            None => {
                let declared = declared_length(&upstream);
                match read_whole(upstream, idle, MAX_REWRITE_BODY, declared).await {
                    Ok(body) => body,
                    Err(error) => {
                        meter.end(false);
                        meter.refused(&error);
                        return Err(error);
                    }
                }
            }
        };
        let body = match translate::answer(self.provider, status, &body, &call.model) {
            Some(body) => body,
            // An error the provider wrote in no shape it documents: passed on as it came.
            None if !status.is_success() => body,
            None => {
                let error = ApiError::new(
                    actix_web::http::StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!(
                        "the upstream's answer is not a {} answer",
                        self.provider.as_str()
                    ),
                );
                meter.end(false);
                meter.refused(&error);
                return Err(error);
            }
        };
        meter.push(&body);
        meter.end(true);
        response.insert_header((CONTENT_TYPE, "application/json"));
        Ok(response.body(body))
    }
}

/// The length the upstream declared for its body.
fn declared_length(upstream: &UpstreamResponse) -> Option<u64> {
    upstream
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a small non-streamed answer (a declared length of up to 64 KiB: chat and text
/// completions, embeddings, errors) while the call can still move to another key: it nearly
/// always arrives with its head, and one that stalls or breaks half way is then a failed
/// attempt like any other, not a failure the client sees. Other answers pass untouched.
///
/// A JSON answer sent without a length (chunked, as Go servers such as Ollama send bodies of
/// more than a few KiB) is read the same way up to 64 KiB and must be whole JSON (a connection
/// lost mid-body is already an error of the patched awc; this also refuses a body that says it
/// is JSON and is not). A larger one goes on to the client as it comes, the part read first
/// included.
pub async fn read_small(
    mut upstream: UpstreamResponse,
    idle: Duration,
    stream: bool,
) -> Result<(UpstreamResponse, Option<Bytes>), ApiError> {
    let content_type = upstream
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let is_sse = has_prefix(content_type, "text/event-stream");
    let is_json = has_prefix(content_type, "application/json");
    let declared = declared_length(&upstream);
    match declared {
        _ if is_sse => Ok((upstream, None)),
        // Not a stream sent as JSON (Gemini's array of events), which goes on as it comes.
        None if is_json && !stream => read_unsized_json(upstream, idle).await,
        Some(length) if length <= WHOLE_BODY_BYTES => {
            let body = read_whole(&mut upstream, idle, WHOLE_BODY_BYTES as usize, declared).await?;
            Ok((upstream, Some(body)))
        }
        _ => Ok((upstream, None)),
    }
}

/// Reads a JSON answer of no declared length (see `read_small`): whole when it ends within
/// 64 KiB, and then it must parse; otherwise the part read is put back in front of the rest.
async fn read_unsized_json(
    mut upstream: UpstreamResponse,
    idle: Duration,
) -> Result<(UpstreamResponse, Option<Bytes>), ApiError> {
    let mut body = BytesMut::new();
    let mut payload = actix_web::HttpMessage::take_payload(&mut upstream);
    while body.len() as u64 <= WHOLE_BODY_BYTES {
        match tokio::time::timeout(idle, payload.next()).await {
            Ok(Some(Ok(chunk))) => body.extend_from_slice(&chunk),
            Ok(None) => {
                let body = body.freeze();
                if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
                    return Err(body_failed("it ended before it was whole JSON"));
                }
                return Ok((upstream, Some(body)));
            }
            Ok(Some(Err(_))) => return Err(body_failed("the connection broke")),
            Err(_) => return Err(body_stalled(idle)),
        }
    }
    let read = futures_util::stream::once(async move { Ok(body.freeze()) });
    let rest: std::pin::Pin<Box<dyn Stream<Item = _>>> = Box::pin(read.chain(payload));
    let upstream = upstream.map_body(|_, _| actix_web::dev::Payload::Stream { payload: rest });
    Ok((upstream, None))
}

/// Reads a whole non-streamed answer for the client, showing it to the meter and noting a stored
/// response's id; a body that breaks, stalls or outgrows `limit` ends the call with its error.
async fn read_answer(
    upstream: UpstreamResponse,
    idle: Duration,
    limit: usize,
    meter: &mut CallMeter,
    note_id: &Option<NoteId>,
) -> Result<Bytes, ApiError> {
    let declared = declared_length(&upstream);
    let body = match read_whole(upstream, idle, limit, declared).await {
        Ok(body) => body,
        Err(error) => {
            meter.end(false);
            meter.refused(&error);
            return Err(error);
        }
    };
    answer_read(&body, meter, note_id);
    Ok(body)
}

/// A whole answer, read: shown to the meter, and a stored response's id noted.
fn answer_read(body: &Bytes, meter: &mut CallMeter, note_id: &Option<NoteId>) {
    meter.push(body);
    meter.end(true);
    // Only a stored response's id is looked for: a tuple pattern would search every answer.
    if let Some(note) = note_id {
        if let Some(id) = first_id(body) {
            note.note(id);
        }
    }
}

/// Reads a whole upstream body of at most `limit` bytes (of `declared` bytes, when its length
/// was declared), waiting at most `idle` for each chunk
/// (awc's response timeout ends with the head: a provider that stalls mid-body would otherwise
/// hold the call forever).
async fn read_whole<S>(
    mut upstream: S,
    idle: Duration,
    limit: usize,
    declared: Option<u64>,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin,
{
    // A body that comes in one chunk, as most do, is kept as it came, without a copy.
    let mut first: Option<Bytes> = None;
    let mut body = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, upstream.next()).await {
            Ok(Some(Ok(chunk))) => {
                let so_far = first.as_ref().map_or(body.len(), Bytes::len);
                if so_far + chunk.len() > limit {
                    return Err(body_failed("it is larger than the router rewrites"));
                }
                match first.take() {
                    None if body.is_empty() => first = Some(chunk),
                    None => body.extend_from_slice(&chunk),
                    Some(held) => {
                        body.extend_from_slice(&held);
                        body.extend_from_slice(&chunk);
                    }
                }
            }
            Ok(Some(Err(_))) => return Err(body_failed("the connection broke")),
            Ok(None) => {
                let body = first.unwrap_or_else(|| body.freeze());
                // awc reports a connection lost mid-body as a normal end: a body shorter than
                // its declared length is the tell.
                if declared.is_some_and(|length| length != body.len() as u64) {
                    return Err(body_failed("it ended before its declared length"));
                }
                return Ok(body);
            }
            Err(_) => return Err(body_stalled(idle)),
        }
    }
}

/// A 502: the answer's body could not be read whole, for `why`.
fn body_failed(why: &str) -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::BAD_GATEWAY,
        "upstream_error",
        format!("reading the upstream answer failed: {why}"),
    )
}

/// A 504: the answer's body went silent for `idle`.
fn body_stalled(idle: Duration) -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        format!(
            "the upstream sent nothing for {} s in the middle of its answer",
            idle.as_secs()
        ),
    )
}

/// Whether an answer's body is text worth keeping for its usage (JSON, events, subtitles), not
/// audio or an image.
fn is_text(upstream: &UpstreamResponse) -> bool {
    upstream
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| has_prefix(v, "application/json") || has_prefix(v, "text/"))
}

/// The start of a plain-text error: its first 300 characters, on one line, without control
/// characters.
fn plain_words(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect()
}

/// Whether a header value starts with `prefix`, in any case (media types are not case
/// sensitive), without a lowercased copy on every call.
fn has_prefix(value: &str, prefix: &str) -> bool {
    value
        .get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}

/// The upstream body as a stream for the client, with an idle timeout between chunks. An event
/// stream comes with its `framing`.
fn relay_stream<S>(
    upstream: S,
    idle: Duration,
    framing: Option<EventFraming>,
    done: Option<DoneWatcher>,
    watch: Option<IdWatch>,
    meter: CallMeter,
    dialect: Dialect,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + 'static
where
    S: Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin + 'static,
{
    struct State<S> {
        upstream: S,
        framing: Option<EventFraming>,
        done: Option<DoneWatcher>,
        watch: Option<IdWatch>,
        // Dropped with the stream: when it ends, breaks, or the client goes away.
        meter: CallMeter,
        finished: bool,
    }
    impl<S> State<S> {
        /// The stream ended whole: what is left of it to send.
        fn end_whole(&mut self) -> Bytes {
            self.finished = true;
            self.meter.end(true);
            self.framing
                .as_mut()
                .map(EventFraming::finish)
                .unwrap_or_default()
        }
    }
    let is_sse = framing.as_ref().is_some_and(EventFraming::is_events);
    let state = State {
        upstream,
        framing,
        done,
        watch,
        meter,
        finished: false,
    };
    futures_util::stream::unfold(state, move |mut st| async move {
        loop {
            if st.finished {
                return None;
            }
            match tokio::time::timeout(idle, st.upstream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    if let Some(done) = &mut st.done {
                        done.observe(&chunk);
                    }
                    if st.watch.as_mut().is_some_and(|w| w.observe(&chunk)) {
                        st.watch = None;
                    }
                    st.meter.push(&chunk);
                    let out = match &mut st.framing {
                        Some(framing) => framing.push(chunk),
                        None => chunk,
                    };
                    if !out.is_empty() {
                        return Some((Ok(out), st));
                    }
                }
                Ok(None) if st.done.as_ref().is_some_and(|d| !d.ended()) => {
                    st.finished = true;
                    st.meter.end(false);
                    tracing::warn!("upstream stream ended without its last event");
                    let event = dialect.stream_error_event(false);
                    return Some((Ok(Bytes::from_static(event)), st));
                }
                // The end, or a connection that breaks or goes silent after the stream's last
                // event: the answer was whole.
                Ok(None) => {
                    let rest = st.end_whole();
                    if !rest.is_empty() {
                        return Some((Ok(rest), st));
                    }
                }
                Ok(Some(Err(_))) | Err(_) if st.done.as_ref().is_some_and(DoneWatcher::ended) => {
                    let rest = st.end_whole();
                    if !rest.is_empty() {
                        return Some((Ok(rest), st));
                    }
                }
                outcome @ (Ok(Some(Err(_))) | Err(_)) => {
                    st.finished = true;
                    st.meter.end(false);
                    let stalled = outcome.is_err();
                    tracing::warn!(stalled, "upstream stream broke after the first byte");
                    if is_sse {
                        // Tell the SDK the stream failed; a silent end would look complete. Only
                        // whole lines have gone out before it (a partial last line is held back
                        // and dropped), so it is always read as an event of its own.
                        let event = dialect.stream_error_event(stalled);
                        return Some((Ok(Bytes::from_static(event)), st));
                    }
                    let err = std::io::Error::other("upstream stream interrupted");
                    return Some((Err(err), st));
                }
            }
        }
    })
}

/// How an event stream goes out: in whole lines, rewritten when a mapped model or a hidden
/// usage asks for it.
enum EventFraming {
    Lines(WholeLines),
    Rewrite(SseRewriter),
    /// Not events: a stream sent as one JSON array (Gemini's without `alt=sse`).
    Array(ArrayRewriter),
}

impl EventFraming {
    fn push(&mut self, chunk: Bytes) -> Bytes {
        match self {
            EventFraming::Lines(lines) => lines.push(chunk),
            EventFraming::Rewrite(rewriter) => rewriter.push(chunk),
            EventFraming::Array(rewriter) => rewriter.push(&chunk),
        }
    }

    fn finish(&mut self) -> Bytes {
        match self {
            EventFraming::Lines(lines) => lines.finish(),
            EventFraming::Rewrite(rewriter) => rewriter.finish(),
            EventFraming::Array(rewriter) => rewriter.pending.split().freeze(),
        }
    }

    /// Whether the stream is one of events, which a break ends with an error event of its own.
    fn is_events(&self) -> bool {
        !matches!(self, EventFraming::Array(_))
    }
}

/// Restores the client's model name in each object of a stream sent as one JSON array: an
/// object goes out once whole, with its name set; the brackets and commas between pass as they
/// come.
struct ArrayRewriter {
    model: String,
    /// The object being read.
    pending: BytesMut,
    /// How deep in the object the reader is (0: between objects).
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl ArrayRewriter {
    fn new(model: String) -> Self {
        ArrayRewriter {
            model,
            pending: BytesMut::new(),
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        for &byte in chunk {
            if self.depth == 0 {
                if byte == b'{' {
                    self.depth = 1;
                    self.pending.extend_from_slice(b"{");
                } else {
                    out.extend_from_slice(&[byte]);
                }
                continue;
            }
            self.pending.extend_from_slice(&[byte]);
            if self.in_string {
                match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let object = self.pending.split();
                        match rename_model_in_json(&object, &self.model) {
                            Some(renamed) => out.extend_from_slice(&renamed),
                            None => out.extend_from_slice(&object),
                        }
                    }
                }
                _ => {}
            }
        }
        out.freeze()
    }
}

/// Holds the partial last line of an event stream until its end arrives, so only whole lines
/// reach the client. A chunk that ends a line (as providers send them) passes without a copy.
#[derive(Default)]
struct WholeLines {
    pending: BytesMut,
}

impl WholeLines {
    /// Takes a chunk; returns the whole lines it completes.
    fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.pending.is_empty() && chunk.last() == Some(&b'\n') {
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        match memchr::memrchr(b'\n', &self.pending) {
            Some(end) => self.pending.split_to(end + 1).freeze(),
            None => Bytes::new(),
        }
    }

    /// The stream ended normally: what is left of it.
    fn finish(&mut self) -> Bytes {
        self.pending.split().freeze()
    }
}

/// Watches a stream for the event that ends it normally, across chunk boundaries.
struct DoneWatcher {
    ends: StreamEnd,
    /// The start of the line the last chunk ended in (the first `LINE_HEAD` bytes), or for
    /// `StreamEnd::Keys` the last bytes, where a key split by the next chunk may start.
    head: Vec<u8>,
    seen: bool,
}

/// What ends a route's stream normally.
#[derive(Clone, Copy)]
enum StreamEnd {
    /// A `data: [DONE]` line (chat and text completions).
    Done,
    /// An event of one of these names, in its `event:` line or as the `type` its `data:` line's
    /// object starts with (responses and messages streams, which also end with an `error`).
    Events(&'static [&'static [u8]]),
    /// An event holding one of these keys (Gemini's `"finishReason"`, or the `"blockReason"` of
    /// a prompt it blocked): unescaped quotes around a name followed by a colon are a key,
    /// never text inside a string.
    Keys(&'static [&'static [u8]]),
}

/// How much of a line the watcher keeps: an event's name or `type` comes first.
const LINE_HEAD: usize = 96;

impl DoneWatcher {
    /// The watcher for a route's streams (`path` with its query), when they have a known last
    /// event.
    fn for_path(path: &str) -> Option<Self> {
        const RESPONSE_END: &[&[u8]] = &[
            b"response.completed",
            b"response.incomplete",
            b"response.failed",
            b"error",
        ];
        const MESSAGE_END: &[&[u8]] = &[b"message_stop", b"error"];
        const TRANSCRIPT_END: &[&[u8]] = &[b"transcript.text.done", b"error"];
        const SPEECH_END: &[&[u8]] = &[b"speech.audio.done", b"error"];
        const IMAGE_END: &[&[u8]] = &[b"image_generation.completed", b"error"];
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        let ends = match route {
            "/chat/completions" | "/completions" => StreamEnd::Done,
            "/responses" => StreamEnd::Events(RESPONSE_END),
            "/messages" => StreamEnd::Events(MESSAGE_END),
            "/audio/transcriptions" | "/audio/translations" => StreamEnd::Events(TRANSCRIPT_END),
            "/audio/speech" => StreamEnd::Events(SPEECH_END),
            "/images/generations" => StreamEnd::Events(IMAGE_END),
            // Gemini's event stream; its JSON-array form is not watched (an error event would
            // not fit it), and a cut there shows as an unclosed array.
            _ if route.ends_with(":streamGenerateContent")
                && query.split('&').any(|p| p == "alt=sse") =>
            {
                StreamEnd::Keys(&[b"\"finishReason\":", b"\"blockReason\":"])
            }
            _ => return None,
        };
        Some(DoneWatcher {
            ends,
            head: Vec::new(),
            seen: false,
        })
    }

    fn observe(&mut self, chunk: &[u8]) {
        if self.seen {
            return;
        }
        if let StreamEnd::Keys(keys) = self.ends {
            self.head.extend_from_slice(chunk);
            self.seen = keys.iter().any(|key| contains(&self.head, key));
            let keep = keys.iter().map(|key| key.len()).max().unwrap_or(1) - 1;
            if self.head.len() > keep {
                self.head.drain(..self.head.len() - keep);
            }
            return;
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            let (piece, ended) = match memchr::memchr(b'\n', rest) {
                Some(at) => (&rest[..at], true),
                None => (rest, false),
            };
            rest = &rest[(piece.len() + usize::from(ended)).min(rest.len())..];
            let room = LINE_HEAD.saturating_sub(self.head.len());
            self.head.extend_from_slice(&piece[..piece.len().min(room)]);
            if ended {
                if self.ends_here() {
                    self.seen = true;
                    return;
                }
                self.head.clear();
            }
        }
    }

    /// Whether the stream ended normally: its last event seen, or in the unfinished line it
    /// closed on (a last line without its newline).
    fn ended(&self) -> bool {
        self.seen || (!matches!(self.ends, StreamEnd::Keys(_)) && self.ends_here())
    }

    /// Whether the line in `head` ends the stream.
    fn ends_here(&self) -> bool {
        let line = self.head.strip_suffix(b"\r").unwrap_or(&self.head);
        let field = |name: &[u8]| {
            line.strip_prefix(name)
                .map(|value| value.strip_prefix(b" ").unwrap_or(value))
        };
        match self.ends {
            StreamEnd::Done => field(b"data:") == Some(b"[DONE]"),
            StreamEnd::Events(names) => {
                if let Some(name) = field(b"event:") {
                    return names.contains(&name);
                }
                let Some(data) = field(b"data:") else {
                    return false;
                };
                let typed = data
                    .strip_prefix(b"{")
                    .map(<[u8]>::trim_ascii_start)
                    .and_then(|d| d.strip_prefix(b"\"type\""))
                    .map(<[u8]>::trim_ascii_start)
                    .and_then(|d| d.strip_prefix(b":"))
                    .map(<[u8]>::trim_ascii_start)
                    .and_then(|d| d.strip_prefix(b"\""));
                typed.is_some_and(|d| {
                    names
                        .iter()
                        .any(|n| d.strip_prefix(*n).is_some_and(|r| r.first() == Some(&b'"')))
                })
            }
            StreamEnd::Keys(_) => false,
        }
    }
}

/// The members that name the model an answer (or a stream event) came from: OpenAI's and
/// Anthropic's `model`, Gemini's `modelVersion`.
const MODEL_KEYS: [&str; 2] = ["model", "modelVersion"];

/// Sets the model `object` names (itself, or in the response or message a stream event
/// describes) to `model`.
fn rename_model(object: &mut serde_json::Map<String, Value>, model: &str) {
    for key in MODEL_KEYS {
        if object.contains_key(key) {
            object.insert(key.into(), Value::String(model.to_owned()));
        }
    }
    // Response streams carry the model in the response their events describe, Anthropic's
    // `message_start` in its message.
    for nested in ["response", "message"] {
        if let Some(Value::Object(inner)) = object.get_mut(nested) {
            if inner.contains_key("model") {
                inner.insert("model".into(), Value::String(model.to_owned()));
            }
        }
    }
}

/// Sets the model a JSON object body names; other JSON passes unchanged; `None` when the body
/// is not JSON at all.
fn rename_model_in_json(body: &[u8], model: &str) -> Option<Bytes> {
    Some(match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(mut object) if MODEL_KEYS.iter().any(|k| object.contains_key(*k)) => {
            rename_model(&mut object, model);
            serde_json::to_vec(&object)
                .map(Bytes::from)
                .unwrap_or_else(|_| Bytes::copy_from_slice(body))
        }
        _ => Bytes::copy_from_slice(body),
    })
}

/// Rewrites the `data:` lines of an SSE stream: restores the client's model name, and removes
/// the usage Switchyard asked for on the client's behalf (the usage event, and the
/// `"usage":null` member of every other event). Complete lines pass on at once; only a partial
/// last line is held until its end arrives.
pub struct SseRewriter {
    model: Option<String>,
    hide_usage: bool,
    lines: WholeLines,
    /// The blank line that ended a removed event is removed too.
    skip_blank: bool,
}

impl SseRewriter {
    fn new(model: Option<String>, hide_usage: bool) -> Self {
        SseRewriter {
            model,
            hide_usage,
            lines: WholeLines::default(),
            skip_blank: false,
        }
    }

    /// Takes a chunk; returns the complete lines it finished, rewritten.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let complete = self.lines.push(chunk);
        self.rewrite(&complete)
    }

    /// The stream ended: whatever partial line is left, rewritten.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.lines.finish();
        self.rewrite(&rest)
    }

    fn rewrite(&mut self, lines: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(lines.len() + 16);
        for line in lines.split_inclusive(|b| *b == b'\n') {
            self.rewrite_line(line, &mut out);
        }
        out.freeze()
    }

    fn rewrite_line(&mut self, line: &[u8], out: &mut BytesMut) {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let (content, cr) = match content.strip_suffix(b"\r") {
            Some(c) => (c, true),
            None => (content, false),
        };
        if std::mem::take(&mut self.skip_blank) && content.is_empty() {
            return;
        }
        let payload = content
            .strip_prefix(b"data:")
            .map(<[u8]>::trim_ascii_start)
            .filter(|p| p.first() == Some(&b'{'));
        let Some(payload) = payload else {
            out.extend_from_slice(line);
            return;
        };
        let mentions_usage = self.hide_usage && contains(payload, b"\"usage\"");
        if self.model.is_none() && !mentions_usage {
            out.extend_from_slice(line);
            return;
        }
        let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(payload) else {
            out.extend_from_slice(line);
            return;
        };
        if mentions_usage {
            let reports_usage = object.get("usage").is_some_and(|u| !u.is_null());
            let no_choices = object
                .get("choices")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
            if reports_usage && no_choices {
                // The event that only carries the usage: removed, with its blank line.
                self.skip_blank = true;
                return;
            }
            // The usage a server put on a chunk with choices (its last, say), or its `null`
            // on the others: the client asked for none.
            object.remove("usage");
        }
        if let Some(model) = &self.model {
            rename_model(&mut object, model);
        }
        match serde_json::to_vec(&object) {
            Ok(json) => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&json);
                if cr {
                    out.extend_from_slice(b"\r");
                }
                if line.ends_with(b"\n") {
                    out.extend_from_slice(b"\n");
                }
            }
            Err(_) => out.extend_from_slice(line),
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_get_the_asked_model_even_when_split_across_chunks() {
        let mut r = SseRewriter::new(Some("asked".into()), false);
        let a = r.push(Bytes::from_static(
            b"data: {\"id\":1,\"model\":\"real\"}\n\ndata: {\"mo",
        ));
        assert_eq!(&a[..], b"data: {\"id\":1,\"model\":\"asked\"}\n\n");
        let b = r.push(Bytes::from_static(b"del\":\"real\"}\n\ndata: [DONE]\n\n"));
        assert_eq!(&b[..], b"data: {\"model\":\"asked\"}\n\ndata: [DONE]\n\n");
        assert!(r.finish().is_empty());
    }

    #[test]
    fn usage_the_client_did_not_ask_for_is_removed() {
        let mut r = SseRewriter::new(None, true);
        let a = r.push(Bytes::from_static(
            b"data: {\"id\":1,\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n",
        ));
        let a: Value =
            serde_json::from_slice(a.strip_prefix(b"data: ").unwrap().trim_ascii()).unwrap();
        assert!(a.get("usage").is_none());
        assert_eq!(a["id"], 1);
        let b = r.push(Bytes::from_static(
            b"data: {\"id\":1,\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(&b[..], b"data: [DONE]\n\n");
        // A server that puts the usage on its last chunk with choices: the usage goes, the
        // choices stay; a usage chunk without `choices` at all goes whole.
        let c = r.push(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1}}\n\n",
        ));
        let c: Value =
            serde_json::from_slice(c.strip_prefix(b"data: ").unwrap().trim_ascii()).unwrap();
        assert!(c.get("usage").is_none(), "{c}");
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        let d = r.push(Bytes::from_static(
            b"data: {\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(&d[..], b"data: [DONE]\n\n");
    }

    /// An end is an event of its own, never the same words inside a delta; Gemini's event
    /// stream ends with a candidate's `finishReason`.
    #[test]
    fn ends_are_events_not_text() {
        let seen = |path: &str, chunks: &[&[u8]]| {
            let mut w = DoneWatcher::for_path(path).unwrap();
            chunks.iter().for_each(|c| w.observe(c));
            w.ended()
        };
        let text = |t: &str| {
            format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"type\":\"text_delta\",\"text\":\"{t}\"}}}}\n\n")
        };
        for words in ["message_stop", "event: error"] {
            assert!(!seen("/messages", &[text(words).as_bytes()]), "{words}");
        }
        assert!(seen(
            "/messages",
            &[
                b"event: message_st",
                b"op\ndata: {\"type\":\"message_stop\"}\n\n"
            ]
        ));
        assert!(
            seen("/messages", &[b"data: {\"type\": \"message_stop\"}"]),
            "no newline at the end"
        );
        assert!(seen(
            "/responses",
            &[b"data: {\"type\":\"response.failed\",\"response\":{}}\n\n"]
        ));
        assert!(!seen(
            "/responses",
            &[b"data: {\"type\":\"response.completed_x\"}\n\n"]
        ));
        let gemini = "/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
        assert!(!seen(
            gemini,
            &[b"data: {\"candidates\":[{\"content\":{}}]}\r\n\r\n"]
        ));
        assert!(seen(
            gemini,
            &[
                b"data: {\"candidates\":[{\"finish",
                b"Reason\":\"STOP\"}]}\r\n\r\n"
            ]
        ));
        assert!(seen(
            gemini,
            &[b"data: {\"promptFeedback\":{\"blockReason\":\"SAFETY\"}}\r\n\r\n"]
        ));
        assert!(DoneWatcher::for_path("/models/g:streamGenerateContent").is_none());
    }

    #[test]
    fn event_streams_go_out_in_whole_lines() {
        let mut lines = WholeLines::default();
        let whole = Bytes::from_static(b"data: {\"a\":1}\n\n");
        assert_eq!(lines.push(whole.clone()), whole);
        assert!(lines.push(Bytes::from_static(b"data: {\"b\"")).is_empty());
        assert_eq!(
            &lines.push(Bytes::from_static(b":2}\n\ndata: {\"c"))[..],
            b"data: {\"b\":2}\n\n"
        );
        assert_eq!(&lines.finish()[..], b"data: {\"c");
    }

    #[test]
    fn done_is_seen_even_when_split() {
        let mut w = DoneWatcher::for_path("/chat/completions").unwrap();
        w.observe(b"data: {}\n\ndata: [DO");
        assert!(!w.seen);
        w.observe(b"NE]\n\n");
        assert!(w.seen);
        let mut w = DoneWatcher::for_path("/responses").unwrap();
        w.observe(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\"}\n\n");
        assert!(!w.seen);
        w.observe(b"event: response.completed\ndata: {\"type\":\"response.comp");
        w.observe(b"leted\",\"response\":{}}\n\n");
        assert!(w.seen);
        // The streams of the audio and image routes end with their own last events too, so a
        // cut one ends with an error event rather than as if whole.
        for (path, end) in [
            ("/audio/transcriptions", "transcript.text.done"),
            ("/audio/speech", "speech.audio.done"),
            ("/images/generations", "image_generation.completed"),
        ] {
            let mut w = DoneWatcher::for_path(path).unwrap();
            w.observe(b"data: {\"type\":\"x.delta\",\"delta\":\"done\"}\n\n");
            assert!(!w.seen, "{path}");
            w.observe(format!("data: {{\"type\":\"{end}\"}}\n\n").as_bytes());
            assert!(w.seen, "{path}");
        }
        assert!(DoneWatcher::for_path("/embeddings").is_none());
    }

    #[test]
    fn done_is_a_line_of_its_own_with_or_without_a_space() {
        let seen = |chunks: &[&[u8]]| {
            let mut w = DoneWatcher::for_path("/chat/completions").unwrap();
            chunks.iter().for_each(|c| w.observe(c));
            w.seen
        };
        assert!(seen(&[b"data: [DONE]\n\n"]));
        assert!(seen(&[b"data: {}\r\n\r\ndata:[DONE]\r\n\r\n"]));
        assert!(seen(&[b"data: {}\n", b"\ndata:[DO", b"NE]\n\n"]));
        // The same text inside a delta is content, not the end.
        assert!(!seen(&[b"data: {\"content\":\"data: [DONE]\"}\n\n"]));
    }

    #[test]
    fn response_events_get_the_asked_model() {
        let mut r = SseRewriter::new(Some("asked".into()), false);
        let out = r.push(Bytes::from_static(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"model\":\"real\"}}\n\n"));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.starts_with("event: response.created\ndata: "),
            "{text}"
        );
        let data = text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
        let event: Value = serde_json::from_str(data).unwrap();
        assert_eq!(event["response"]["model"], "asked");
    }

    /// Each object of a JSON-array stream gets the asked name, however the chunks cut it, and
    /// braces inside strings are text.
    #[test]
    fn array_streams_get_the_asked_model() {
        let mut r = ArrayRewriter::new("asked".into());
        let mut out = Vec::new();
        for chunk in [
            &b"[{\"modelVersion\":\"real\",\"t\":\"a}\\\"{\"},\r\n{\"model"[..],
            b"Version\":\"real\",\"n\":[1,{\"x\":2}]}",
            b"]",
        ] {
            out.extend_from_slice(&r.push(chunk));
        }
        let array: Vec<Value> = serde_json::from_slice(&out).unwrap();
        assert_eq!(array.len(), 2);
        assert!(
            array.iter().all(|o| o["modelVersion"] == "asked"),
            "{array:?}"
        );
        assert_eq!(array[0]["t"], "a}\"{");
        assert_eq!(array[1]["n"][1]["x"], 2);
        assert!(r.pending.is_empty());
    }

    #[test]
    fn json_bodies_get_the_asked_model() {
        let out = rename_model_in_json(br#"{"model":"real","x":1}"#, "asked").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "asked");
        assert_eq!(v["x"], 1);
        assert_eq!(&rename_model_in_json(b"[1]", "a").unwrap()[..], b"[1]");
        assert!(rename_model_in_json(br#"{"model":"real","x""#, "a").is_none());
    }
}

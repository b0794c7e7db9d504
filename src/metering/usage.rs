//! The usage of one call, read from whatever shape its answer has: OpenAI chat and text
//! completions (JSON and streamed), responses, embeddings, images, speech and transcriptions.
//! When a stream was cut before the provider reported its usage, what was delivered is counted
//! instead (the prompt from the request, the completion from the text relayed), and the call is
//! marked partial.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use super::observed::Observed;
use crate::limits::estimate;

/// What a call used, in the units it is billed in.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    /// Input tokens, cached ones included.
    pub prompt_tokens: i64,
    /// Output tokens, reasoning ones included.
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    /// Images generated.
    pub images: i64,
    /// Seconds of audio transcribed.
    pub audio_seconds: f64,
    /// Characters of text spoken.
    pub characters: i64,
}

impl Usage {
    /// Tokens in and out, as rate limits count them.
    pub fn total_tokens(&self) -> i64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// The kind of call, from its route, which decides where its usage is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Images,
    Speech,
    Transcriptions,
    /// Anthropic's Messages API.
    Messages,
    /// Gemini's `generateContent` and `streamGenerateContent`.
    Gemini,
    Other,
}

impl Endpoint {
    /// The kind of a data-plane path (`/v1/...`).
    pub fn of(path: &str) -> Endpoint {
        if path.starts_with("/v1beta/models/") {
            return Endpoint::Gemini;
        }
        match path.strip_prefix("/v1").unwrap_or(path) {
            "/messages" => Endpoint::Messages,
            "/chat/completions" => Endpoint::Chat,
            "/completions" => Endpoint::Completions,
            "/responses" => Endpoint::Responses,
            "/embeddings" => Endpoint::Embeddings,
            "/images/generations" => Endpoint::Images,
            "/audio/speech" => Endpoint::Speech,
            "/audio/transcriptions" | "/audio/translations" => Endpoint::Transcriptions,
            _ => Endpoint::Other,
        }
    }

    /// Whether a streamed answer of this kind reports usage only when asked
    /// (`stream_options.include_usage`).
    pub fn usage_on_request(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }
}

/// Image size and quality asked for, which select an image's price.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub size: Option<String>,
    pub quality: Option<String>,
}

/// The usage the provider reported, if it reported any. Cheap enough for the request thread
/// (no tokenizer): the rate limiter settles with it.
pub fn reported(endpoint: Endpoint, observed: &Observed) -> Option<Usage> {
    if !observed.succeeded() {
        return None;
    }
    let body = observed.body();
    if body.is_empty() {
        return None;
    }
    match endpoint {
        Endpoint::Gemini => return gemini_usage(body),
        Endpoint::Messages if observed.stream => return message_stream_usage(body),
        _ => {}
    }
    if observed.stream {
        return data_events(body)
            .filter_map(|event| serde_json::from_slice::<Answer>(event).ok())
            .filter_map(Answer::into_usage)
            .next_back();
    }
    if let Some(usage) = trailing_usage(body) {
        return Some(usage);
    }
    match serde_json::from_slice::<Answer>(body) {
        Ok(answer) => answer.into_usage(),
        // Transcriptions in `srt` or `vtt` format: the last cue's end is the audio's length.
        Err(_) if endpoint == Endpoint::Transcriptions => subtitle_seconds(body).map(|s| Usage {
            audio_seconds: s,
            ..Usage::default()
        }),
        // Only the tail of a large answer is kept (images in base64, say): its usage is the
        // last usage object in it, which other fields may follow (a Responses answer ends
        // `"usage": {…}, "user": null, "metadata": {}`).
        Err(_) if observed.truncated => last_usage(body).and_then(|(usage, _)| usage.into_usage()),
        Err(_) => None,
    }
}

/// Everything the call used: the provider's report, completed with what the request says
/// (images asked for, characters spoken), or, for a stream cut before its report, an estimate
/// of what was delivered. `model` picks the tokenizer of the estimate.
pub fn measure(
    endpoint: Endpoint,
    observed: &Observed,
    reported_usage: Option<Usage>,
    request: &[u8],
    model: &str,
) -> Option<Usage> {
    let mut usage = reported_usage;
    match endpoint {
        Endpoint::Speech if observed.succeeded() => {
            let input = request_json(request);
            let characters = input
                .as_ref()
                .and_then(|v| v.get("input"))
                .and_then(Value::as_str)
                .map_or(0, |s| s.chars().count() as i64);
            usage.get_or_insert_with(Usage::default).characters = characters;
        }
        Endpoint::Images if observed.succeeded() => {
            let images = if observed.truncated {
                observed.images_seen
            } else {
                serde_json::from_slice::<ImagesAnswer>(observed.body())
                    .ok()
                    .and_then(|a| a.data)
                    .map_or(0, |d| d.len() as i64)
            };
            usage.get_or_insert_with(Usage::default).images = images;
        }
        // A stream with no usage (cut before it, or from a server that sends none even when
        // asked, or when `request_stream_usage` is off) is metered from what it delivered,
        // not at nothing.
        Endpoint::Chat | Endpoint::Completions | Endpoint::Responses
            if usage.is_none() && observed.stream && observed.succeeded() =>
        {
            usage = Some(delivered(observed, request, model));
        }
        // Anthropic reports the prompt when a stream starts and the completion at its end,
        // Gemini a running count in every event: a cut stream's completion is at least the
        // text it delivered.
        // A transcript that says nothing of the audio's length (`response_format=text`, or a
        // server's bare `{"text"}`) is metered from the words spoken, at 150 a minute, rather
        // than at nothing.
        Endpoint::Transcriptions if usage.is_none() && observed.succeeded() => {
            usage = Some(Usage {
                audio_seconds: spoken_seconds(observed.body()),
                ..Usage::default()
            });
        }
        Endpoint::Messages | Endpoint::Gemini
            if observed.stream
                && observed.succeeded()
                && (usage.is_none() || observed.partial()) =>
        {
            let seen = delivered(observed, request, model);
            usage = Some(match usage {
                Some(usage) => Usage {
                    completion_tokens: usage.completion_tokens.max(seen.completion_tokens),
                    ..usage
                },
                None => seen,
            });
        }
        _ => {}
    }
    usage
}

/// The size and quality an image call asked for.
pub fn image_spec(request: &[u8]) -> ImageSpec {
    let value = request_json(request);
    let field = |name: &str| {
        value
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    ImageSpec {
        size: field("size"),
        quality: field("quality"),
    }
}

fn request_json(request: &[u8]) -> Option<Value> {
    serde_json::from_slice(request).ok()
}

/// What a stream without usage delivered: its prompt counted from the request and its completion
/// from the text relayed (before the cut, for a cut one).
fn delivered(observed: &Observed, request: &[u8], model: &str) -> Usage {
    let mut text = String::new();
    for event in data_events(observed.body()) {
        if let Ok(delta) = serde_json::from_slice::<Delta>(event) {
            delta.append_text(&mut text);
        }
    }
    Usage {
        prompt_tokens: estimate::prompt_tokens(model, request),
        completion_tokens: estimate::text_tokens(model, &text),
        ..Usage::default()
    }
}

/// The usage of a JSON answer whose last member is `usage`, where OpenAI and the servers that
/// copy it put it, read without parsing the rest (the choices, often most of the answer).
/// `None` when the answer does not end that way, or its usage says nothing: the caller then
/// parses the whole answer.
///
/// The last `"usage"` followed by `:` is an object key: inside a JSON string a quote is always
/// escaped, and a string followed by a colon is a key. Its object is the answer itself when
/// nothing but the answer's closing brace follows its value.
fn trailing_usage(body: &[u8]) -> Option<Usage> {
    let (reported, rest) = last_usage(body)?;
    if rest
        .trim_ascii()
        .strip_prefix(b"}")?
        .trim_ascii()
        .is_empty()
    {
        reported.into_usage()
    } else {
        None
    }
}

/// The value of the last `"usage"` key in `body`, read as a usage report, and what follows it.
fn last_usage(body: &[u8]) -> Option<(Reported, &[u8])> {
    const KEY: &[u8] = b"\"usage\"";
    let at = memchr::memmem::rfind(body, KEY)?;
    let value = body[at + KEY.len()..]
        .trim_ascii_start()
        .strip_prefix(b":")?;
    let mut reader = serde_json::Deserializer::from_slice(value).into_iter::<Reported>();
    let reported = reader.next()?.ok()?;
    Some((reported, &value[reader.byte_offset()..]))
}

/// The usage of a Gemini answer: the last `usageMetadata` in it, whether the answer is one
/// object, a stream of events, or a stream sent as one JSON array (each event's count is the
/// running total, so the last is the call's, or what a cut stream reached).
fn gemini_usage(body: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usageMetadata\"";
    let mut end = body.len();
    // The last one that reads: a cut stream's may be half there.
    while let Some(at) = memchr::memmem::rfind(&body[..end], KEY) {
        end = at;
        let Some(value) = body[at + KEY.len()..].trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let mut reader = serde_json::Deserializer::from_slice(value).into_iter::<GeminiUsage>();
        if let Some(Ok(usage)) = reader.next() {
            return Some(usage.into_usage());
        }
    }
    None
}

/// Gemini's `usageMetadata`: thinking tokens are billed as output but counted apart from the
/// candidates'; the cached part of the prompt is inside `promptTokenCount`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiUsage {
    prompt_token_count: Option<i64>,
    candidates_token_count: Option<i64>,
    thoughts_token_count: Option<i64>,
    cached_content_token_count: Option<i64>,
    tool_use_prompt_token_count: Option<i64>,
}

impl GeminiUsage {
    fn into_usage(self) -> Usage {
        let thoughts = self.thoughts_token_count.unwrap_or(0);
        Usage {
            prompt_tokens: self.prompt_token_count.unwrap_or(0)
                + self.tool_use_prompt_token_count.unwrap_or(0),
            completion_tokens: self.candidates_token_count.unwrap_or(0) + thoughts,
            reasoning_tokens: thoughts,
            cached_tokens: self.cached_content_token_count.unwrap_or(0),
            ..Usage::default()
        }
    }
}

/// The usage of an Anthropic Messages stream: the prompt from `message_start` (its message's
/// usage), the completion from the last `message_delta` (a running count), whose prompt
/// figures, when it has them, are the final ones.
fn message_stream_usage(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Event {
        message: Option<Nested>,
        usage: Option<Reported>,
    }
    let mut usage: Option<Usage> = None;
    for event in data_events(body) {
        let Ok(event) = serde_json::from_slice::<Event>(event) else {
            continue;
        };
        if let Some(start) = event
            .message
            .and_then(|m| m.usage)
            .and_then(Reported::into_usage)
        {
            usage = Some(start);
        }
        if let Some(delta) = event.usage {
            let has_prompt = delta.input_tokens.is_some();
            if let Some(delta) = delta.into_usage() {
                let usage = usage.get_or_insert_with(Usage::default);
                usage.completion_tokens = delta.completion_tokens;
                if has_prompt {
                    usage.prompt_tokens = delta.prompt_tokens;
                    usage.cached_tokens = delta.cached_tokens;
                }
            }
        }
    }
    usage
}

/// The payloads of a stream's `data:` lines, `[DONE]` excluded.
fn data_events(body: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    body.split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(<[u8]>::trim_ascii)
        .filter(|payload| payload.first() == Some(&b'{'))
}

/// The end of the last cue of an SRT or WebVTT document, in seconds.
fn subtitle_seconds(body: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(body).ok()?;
    text.lines()
        .filter_map(|line| line.split_once("-->"))
        .filter_map(|(_, end)| parse_timestamp(end.split_whitespace().next()?))
        .reduce(f64::max)
}

/// The seconds it takes to say a transcript (its `text` when it is JSON), at 150 words a
/// minute, a usual rate of speech.
fn spoken_seconds(body: &[u8]) -> f64 {
    #[derive(Deserialize)]
    struct Transcript {
        text: String,
    }
    let text = match serde_json::from_slice::<Transcript>(body) {
        Ok(transcript) => transcript.text,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.split_whitespace().count() as f64 / 2.5
}

/// `HH:MM:SS,mmm` (SRT) or `[HH:]MM:SS.mmm` (WebVTT).
fn parse_timestamp(text: &str) -> Option<f64> {
    let text = text.replace(',', ".");
    let mut seconds = 0.0;
    for part in text.split(':') {
        seconds = seconds * 60.0 + part.parse::<f64>().ok()?;
    }
    Some(seconds)
}

/// The parts of an answer (or of a stream event) that carry usage.
#[derive(Deserialize)]
struct Answer {
    usage: Option<Reported>,
    /// Responses-API stream events nest the response (and its usage).
    response: Option<Nested>,
    /// Verbose transcriptions give the audio's length.
    duration: Option<f64>,
}

#[derive(Deserialize)]
struct Nested {
    usage: Option<Reported>,
}

impl Answer {
    fn into_usage(self) -> Option<Usage> {
        let reported = self.usage.or(self.response.and_then(|r| r.usage));
        match (reported.and_then(Reported::into_usage), self.duration) {
            (Some(usage), _) => Some(usage),
            (None, Some(seconds)) => Some(Usage {
                audio_seconds: seconds,
                ..Usage::default()
            }),
            (None, None) => None,
        }
    }
}

/// Every usage object OpenAI's APIs send: chat and completions (`prompt_tokens`,
/// `completion_tokens`), embeddings (`prompt_tokens` only), responses and image generation
/// (`input_tokens`, `output_tokens`), transcriptions (`{"type": "duration", "seconds"}` or
/// tokens).
#[derive(Deserialize)]
struct Reported {
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    total_tokens: Option<i64>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
    seconds: Option<f64>,
    /// Anthropic's: the prompt's cached part read, and the part written to the cache, both
    /// apart from its `input_tokens`.
    cache_read_input_tokens: Option<i64>,
    cache_creation_input_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<i64>,
    reasoning_tokens: Option<i64>,
}

impl Reported {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() && self.seconds.is_none() {
            // Only a total: count it as prompt, which is what an answer without parts consumed.
            return self.total_tokens.map(|total| Usage {
                prompt_tokens: total,
                ..Usage::default()
            });
        }
        let input_details = self.prompt_tokens_details.or(self.input_tokens_details);
        let output_details = self
            .completion_tokens_details
            .or(self.output_tokens_details);
        let cache_read = self.cache_read_input_tokens.unwrap_or(0);
        let cache_written = self.cache_creation_input_tokens.unwrap_or(0);
        Some(Usage {
            prompt_tokens: prompt.unwrap_or(0) + cache_read + cache_written,
            completion_tokens: completion.unwrap_or(0),
            cached_tokens: input_details.and_then(|d| d.cached_tokens).unwrap_or(0) + cache_read,
            reasoning_tokens: output_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
            audio_seconds: self.seconds.unwrap_or(0.0),
            ..Usage::default()
        })
    }
}

#[derive(Deserialize)]
struct ImagesAnswer {
    data: Option<Vec<IgnoredAny>>,
}

/// The text a stream event adds: chat `choices[].delta.content`, completions `choices[].text`,
/// responses `response.output_text.delta`.
#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(rename = "type")]
    kind: Option<String>,
    delta: Option<Value>,
    /// Gemini's `candidates[].content.parts[].text`.
    #[serde(default)]
    candidates: Vec<Candidate>,
}

#[derive(Deserialize)]
struct Candidate {
    content: Option<CandidateContent>,
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    text: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<ChoiceDelta>,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceDelta {
    content: Option<String>,
    reasoning_content: Option<String>,
}

impl Delta {
    fn append_text(self, out: &mut String) {
        for choice in self.choices {
            if let Some(delta) = choice.delta {
                out.extend(delta.content);
                out.extend(delta.reasoning_content);
            }
            out.extend(choice.text);
        }
        match (self.kind.as_deref(), self.delta) {
            (Some("response.output_text.delta"), Some(Value::String(text))) => out.push_str(&text),
            // Anthropic: `{"type":"content_block_delta","delta":{"type":"text_delta","text":…}}`,
            // `thinking_delta` with `thinking`.
            (Some("content_block_delta"), Some(Value::Object(delta))) => {
                for key in ["text", "thinking", "partial_json"] {
                    if let Some(Value::String(text)) = delta.get(key) {
                        out.push_str(text);
                    }
                }
            }
            _ => {}
        }
        for candidate in self.candidates {
            for part in candidate.content.into_iter().flat_map(|c| c.parts) {
                out.extend(part.text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::web::Bytes;

    fn observed(stream: bool, chunks: &[&'static [u8]]) -> Observed {
        let mut o = Observed::default();
        o.begin(200, stream, true);
        for chunk in chunks {
            o.push(&Bytes::from_static(chunk));
        }
        o.end(true);
        o
    }

    #[test]
    fn chat_usage_with_cached_and_reasoning_parts() {
        let o = observed(
            false,
            &[br#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,"#,
              br#""prompt_tokens_details":{"cached_tokens":40},"completion_tokens_details":{"reasoning_tokens":20}}}"#],
        );
        let usage = reported(Endpoint::Chat, &o).unwrap();
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 100,
                completion_tokens: 50,
                cached_tokens: 40,
                reasoning_tokens: 20,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn a_trailing_usage_is_read_alone_only_when_it_belongs_to_the_answer() {
        let full = |body: &[u8]| {
            serde_json::from_slice::<Answer>(body)
                .ok()
                .and_then(Answer::into_usage)
        };
        let usage = |p, c| Usage {
            prompt_tokens: p,
            completion_tokens: c,
            ..Usage::default()
        };
        // Read alone: the answer's last member, whatever precedes it.
        for body in [
            &br#"{"id":"x","object":"usage","choices":[{"message":{"content":"\"usage\": {}"}}],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#[..],
            br#"{"choices":[] , "usage" : {"prompt_tokens":9,"completion_tokens":2} }
"#,
        ] {
            assert_eq!(trailing_usage(body), Some(usage(9, 2)));
            assert_eq!(full(body), Some(usage(9, 2)));
        }
        // Not the answer's own, or says nothing: the whole answer is parsed instead.
        for body in [
            &br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[{"message":{"usage":{"prompt_tokens":99}}}]}"#[..],
            br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2},"model":"m"}"#,
            br#"{"choices":[],"usage":null}"#,
            br#"[{"usage":{"prompt_tokens":99}}]"#,
        ] {
            assert_eq!(trailing_usage(body), None, "{}", String::from_utf8_lossy(body));
        }
        let o = observed(
            false,
            &[br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[{"message":{"usage":{"prompt_tokens":99}}}]}"#],
        );
        assert_eq!(reported(Endpoint::Chat, &o), Some(usage(1, 2)));
    }

    #[test]
    fn the_last_usage_event_of_a_stream_counts() {
        let o = observed(
            true,
            &[
                b"data: {\"choices\":[],\"usage\":null}\n\n",
                b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
            ],
        );
        assert_eq!(reported(Endpoint::Chat, &o).unwrap().total_tokens(), 7);
    }

    #[test]
    fn responses_streams_report_in_the_completed_event() {
        let o = observed(
            true,
            &[b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":1}}}}\n\n"],
        );
        let usage = reported(Endpoint::Responses, &o).unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.reasoning_tokens
            ),
            (9, 2, 1)
        );
    }

    #[test]
    fn transcriptions_report_seconds_in_any_format() {
        let json = observed(
            false,
            &[br#"{"text":"hi","usage":{"type":"duration","seconds":12}}"#],
        );
        assert_eq!(
            reported(Endpoint::Transcriptions, &json)
                .unwrap()
                .audio_seconds,
            12.0
        );
        let verbose = observed(false, &[br#"{"text":"hi","duration":3.5}"#]);
        assert_eq!(
            reported(Endpoint::Transcriptions, &verbose)
                .unwrap()
                .audio_seconds,
            3.5
        );
        let srt = observed(false, &[b"1\n00:00:00,000 --> 00:00:02,500\nhi\n\n2\n00:00:02,500 --> 00:01:04,250\nthere\n"]);
        assert_eq!(
            reported(Endpoint::Transcriptions, &srt)
                .unwrap()
                .audio_seconds,
            64.25
        );
        // Plain text says nothing of the audio: 25 words are 10 seconds of speech.
        let words = "word ".repeat(25);
        for body in [words.clone(), format!(r#"{{"text":"{words}"}}"#)] {
            let plain = observed(false, &[Box::leak(body.into_bytes().into_boxed_slice())]);
            let usage = reported(Endpoint::Transcriptions, &plain);
            let usage = measure(Endpoint::Transcriptions, &plain, usage, b"", "whisper-1").unwrap();
            assert_eq!(usage.audio_seconds, 10.0);
        }
    }

    #[test]
    fn images_and_speech_are_counted_from_the_answer_and_the_request() {
        let images = observed(
            false,
            &[br#"{"created":1,"data":[{"url":"a"},{"url":"b"}]}"#],
        );
        let usage = measure(Endpoint::Images, &images, None, b"{}", "dall-e-3").unwrap();
        assert_eq!(usage.images, 2);
        let mut speech = Observed::default();
        speech.begin(200, false, false);
        let usage = measure(
            Endpoint::Speech,
            &speech,
            None,
            br#"{"input":"h\u00e9llo"}"#,
            "tts-1",
        )
        .unwrap();
        assert_eq!(usage.characters, 5);
    }

    #[test]
    fn anthropic_usage_counts_the_cache_in_the_prompt() {
        let json = observed(
            false,
            &[br#"{"type":"message","usage":{"input_tokens":10,"output_tokens":3,"cache_read_input_tokens":20,"cache_creation_input_tokens":5}}"#],
        );
        let usage = reported(Endpoint::Messages, &json).unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens
            ),
            (35, 20, 3)
        );
        let stream = observed(
            true,
            &[
                b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1,\"cache_read_input_tokens\":4}}}\n\n",
                b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
            ],
        );
        let usage = reported(Endpoint::Messages, &stream).unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens
            ),
            (14, 4, 9)
        );
    }

    #[test]
    fn gemini_usage_is_the_last_count_in_any_shape() {
        let event = |candidates: i64| {
            format!(
                r#"{{"candidates":[],"usageMetadata":{{"promptTokenCount":7,"candidatesTokenCount":{candidates},"thoughtsTokenCount":2,"cachedContentTokenCount":3}}}}"#
            )
        };
        let array = format!("[{},\n{}]", event(1), event(5));
        let o = observed(false, &[Box::leak(array.into_bytes().into_boxed_slice())]);
        let usage = reported(Endpoint::Gemini, &o).unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.reasoning_tokens,
                usage.cached_tokens
            ),
            (7, 7, 2, 3)
        );
        // A stream cut inside its last count reads the one before.
        let cut = format!(
            "data: {}\r\n\r\ndata: {{\"usageMetadata\":{{\"promptTo",
            event(4)
        );
        let o = observed(true, &[Box::leak(cut.into_bytes().into_boxed_slice())]);
        assert_eq!(reported(Endpoint::Gemini, &o).unwrap().completion_tokens, 6);
    }

    #[test]
    fn a_cut_stream_counts_what_was_delivered() {
        let mut o = Observed::default();
        o.begin(200, true, true);
        o.push(&Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n",
        ));
        o.push(&Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n\n",
        ));
        let request = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#;
        let usage = measure(Endpoint::Chat, &o, None, request, "gpt-4o").unwrap();
        assert!(o.partial());
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (2 + 4 + 3, 2)
        );
    }
}

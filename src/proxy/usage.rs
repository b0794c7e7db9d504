//! The usage an answer reports, read off the bytes relayed to the client. The relay only keeps
//! references to the chunks it passes on (the whole body of a JSON answer, the last few KiB of a
//! stream, where the usage chunk sits); parsing happens later, in a background actor.

use actix_web::web::Bytes;
use serde::Deserialize;

/// Largest JSON answer kept to read its usage.
const MAX_JSON: usize = 4 * 1024 * 1024;
/// Bytes of a stream's end kept: the usage chunk is the last data event before `[DONE]`.
const STREAM_TAIL: usize = 16 * 1024;

/// What was relayed of one answer.
#[derive(Debug, Default)]
pub struct Observed {
    /// Whether the provider answered 2xx.
    pub succeeded: bool,
    stream: bool,
    chunks: Vec<Bytes>,
    kept: usize,
    overflowed: bool,
}

impl Observed {
    pub fn new(succeeded: bool, stream: bool) -> Self {
        Observed {
            succeeded,
            stream,
            ..Observed::default()
        }
    }

    /// Keeps a reference to a relayed chunk.
    pub fn push(&mut self, chunk: &Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.chunks.push(chunk.clone());
        self.kept += chunk.len();
        if self.stream {
            // Keep the newest chunks only, but never fewer than one.
            while self.kept > STREAM_TAIL && self.chunks.len() > 1 {
                self.kept -= self.chunks.remove(0).len();
            }
        } else if self.kept > MAX_JSON {
            self.overflowed = true;
            self.chunks.clear();
            self.kept = 0;
        }
    }

    /// The tokens the answer reports (`usage.total_tokens`, or its parts), if it reports any.
    pub fn total_tokens(&self) -> Option<i64> {
        if self.overflowed || self.chunks.is_empty() {
            return None;
        }
        let bytes: Vec<u8> = self.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        if self.stream {
            // The last data event that carries a usage object.
            bytes
                .split(|b| *b == b'\n')
                .filter_map(|line| line.strip_prefix(b"data:"))
                .filter_map(|payload| {
                    serde_json::from_slice::<WithUsage>(payload.trim_ascii()).ok()
                })
                .filter_map(|event| event.usage)
                .next_back()
                .and_then(|usage| usage.total())
        } else {
            serde_json::from_slice::<WithUsage>(&bytes)
                .ok()
                .and_then(|answer| answer.usage)
                .and_then(|usage| usage.total())
        }
    }
}

/// Collects what is relayed of an answer and hands it to its sink when the answer ends, however
/// it ends: completed, broken, or dropped because the client went away. An answer that never
/// started (every upstream failed) hands over an empty, unsuccessful observation.
pub struct Tap {
    observed: Observed,
    sink: Option<Box<dyn FnOnce(Observed)>>,
}

impl Tap {
    pub fn new(sink: impl FnOnce(Observed) + 'static) -> Self {
        Tap {
            observed: Observed::default(),
            sink: Some(Box::new(sink)),
        }
    }

    /// The upstream answered: with what status, as a stream or whole.
    pub fn begin(&mut self, succeeded: bool, stream: bool) {
        self.observed = Observed::new(succeeded, stream);
    }

    /// A chunk relayed to the client (as the provider sent it).
    pub fn push(&mut self, chunk: &Bytes) {
        self.observed.push(chunk);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            sink(std::mem::take(&mut self.observed));
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
}

/// OpenAI's usage shapes: chat and completions (`prompt_tokens`, `completion_tokens`),
/// embeddings (`prompt_tokens` only), responses (`input_tokens`, `output_tokens`).
#[derive(Deserialize)]
struct Usage {
    total_tokens: Option<i64>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
}

impl Usage {
    fn total(&self) -> Option<i64> {
        self.total_tokens.or_else(|| {
            let parts = [
                self.prompt_tokens,
                self.completion_tokens,
                self.input_tokens,
                self.output_tokens,
            ];
            parts
                .iter()
                .any(Option::is_some)
                .then(|| parts.iter().flatten().sum())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_is_read_across_chunks() {
        let mut o = Observed::new(true, false);
        o.push(&Bytes::from_static(br#"{"id":"x","usage":{"prompt_"#));
        o.push(&Bytes::from_static(
            br#"tokens":7,"completion_tokens":5,"total_tokens":12}}"#,
        ));
        assert_eq!(o.total_tokens(), Some(12));
    }

    #[test]
    fn the_last_usage_event_of_a_stream_counts() {
        let mut o = Observed::new(true, true);
        o.push(&Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":null}\n\n",
        ));
        o.push(&Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(o.total_tokens(), Some(7));
    }

    #[test]
    fn answers_without_usage_report_none() {
        let mut o = Observed::new(true, false);
        o.push(&Bytes::from_static(b"{\"data\":[]}"));
        assert_eq!(o.total_tokens(), None);
    }
}

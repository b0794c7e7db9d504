//! Tokens a call is charged at admission, before the provider says what it really used.
//!
//! The text a call sends (messages, prompt, input, instructions, tool arguments) is counted with
//! OpenAI's own tokenizer (`o200k_base` or `cl100k_base`, chosen from the model name) when the
//! model is an OpenAI one; for any other model it is estimated as one token per 4 bytes of text,
//! OpenAI's published rule of thumb. Each chat message adds 4 tokens of framing and a reply
//! 3 more, as OpenAI's counting guide does. The completion is charged up front only when the
//! caller caps it (`max_tokens`, `max_completion_tokens`, `max_output_tokens`). The charge is
//! corrected to the provider's `usage` once the answer is known.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

/// Object keys whose values are text sent to the model.
const TEXT_KEYS: [&str; 8] = [
    "content",
    "text",
    "prompt",
    "input",
    "instructions",
    "system",
    "arguments",
    "description",
];

/// Keys that cap the completion.
const CAP_KEYS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Whether each tokenizer has been loaded. A tokenizer's tables take tens of MiB and a few
/// hundred milliseconds to load, so each is loaded on its first use (on the blocking pool), and
/// an installation without token limits never pays for them.
static O200K_LOADED: AtomicBool = AtomicBool::new(false);
static CL100K_LOADED: AtomicBool = AtomicBool::new(false);

/// A tokenizer: whether it is loaded, and its loader.
type Loader = (&'static AtomicBool, fn() -> &'static CoreBPE);

/// Which tokenizer counts `model`, if an OpenAI one does.
fn tokenizer_for(model: &str) -> Option<Loader> {
    // Provider-prefixed names (`openai/gpt-4o`) are counted by their last part.
    let name = model.rsplit('/').next().unwrap_or(model);
    match get_tokenizer(name)? {
        Tokenizer::O200kBase | Tokenizer::O200kHarmony => {
            Some((&O200K_LOADED, tiktoken_rs::o200k_base_singleton))
        }
        Tokenizer::Cl100kBase => Some((&CL100K_LOADED, tiktoken_rs::cl100k_base_singleton)),
        _ => None,
    }
}

/// Whether counting for `model` may load a tokenizer (and so belongs on the blocking pool).
pub fn may_load(model: &str) -> bool {
    tokenizer_for(model).is_some_and(|(loaded, _)| !loaded.load(Ordering::Acquire))
}

fn bpe_for(model: &str) -> Option<&'static CoreBPE> {
    tokenizer_for(model).map(|(loaded, load)| {
        let bpe = load();
        loaded.store(true, Ordering::Release);
        bpe
    })
}

/// The tokens to charge for a JSON call body sent to `model`: its prompt, and its completion
/// cap when it sets one.
pub fn tokens(model: &str, body: &[u8]) -> i64 {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return bytes_estimate(body.len());
    };
    let cap = CAP_KEYS
        .iter()
        .filter_map(|k| value.get(*k).and_then(Value::as_i64))
        .max()
        .unwrap_or(0);
    prompt_of(model, &value) + cap.max(0)
}

/// The prompt tokens of a JSON call body sent to `model`.
pub fn prompt_tokens(model: &str, body: &[u8]) -> i64 {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => prompt_of(model, &value),
        Err(_) => bytes_estimate(body.len()),
    }
}

/// The tokens of a piece of text produced by `model`.
pub fn text_tokens(model: &str, text: &str) -> i64 {
    match bpe_for(model) {
        Some(bpe) => bpe.encode_ordinary(text).len() as i64,
        None => bytes_estimate(text.len()),
    }
}

fn prompt_of(model: &str, value: &Value) -> i64 {
    let mut texts = Vec::new();
    collect(value, false, &mut texts);
    let bpe = bpe_for(model);
    let mut total: i64 = texts
        .iter()
        .map(|text| match text {
            Piece::Text(s) => match bpe {
                Some(bpe) => bpe.encode_ordinary(s).len() as i64,
                None => bytes_estimate(s.len()),
            },
            Piece::TokenId => 1,
        })
        .sum();
    if let Some(messages) = value.get("messages").and_then(Value::as_array) {
        total += 4 * messages.len() as i64 + 3;
    }
    total
}

/// One token per 4 bytes, rounded up.
fn bytes_estimate(len: usize) -> i64 {
    len.div_ceil(4) as i64
}

enum Piece<'a> {
    Text(&'a str),
    /// An element of a pre-tokenised `prompt`/`input` array.
    TokenId,
}

fn collect<'a>(value: &'a Value, text: bool, out: &mut Vec<Piece<'a>>) {
    match value {
        Value::String(s) if text => out.push(Piece::Text(s)),
        Value::Number(_) if text => out.push(Piece::TokenId),
        Value::Array(items) => items.iter().for_each(|v| collect(v, text, out)),
        Value::Object(map) => {
            for (key, v) in map {
                collect(v, TEXT_KEYS.contains(&key.as_str()), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_models_are_counted_with_their_tokenizer() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#;
        // "Hello world" is 2 tokens in o200k_base, plus 4 framing and 3 for the reply.
        assert_eq!(tokens("gpt-4o", body), 2 + 4 + 3);
    }

    #[test]
    fn other_models_are_estimated_from_bytes_and_caps_are_charged() {
        let body = br#"{"model":"claude-x","messages":[{"role":"user","content":[{"type":"text","text":"12345678"}]}],"max_tokens":50}"#;
        assert_eq!(tokens("claude-x", body), 2 + 4 + 3 + 50);
    }

    #[test]
    fn embeddings_inputs_and_token_arrays_count() {
        assert_eq!(tokens("other", br#"{"input":["abcd","efgh"]}"#), 2);
        assert_eq!(tokens("other", br#"{"input":[[1,2,3]]}"#), 3);
    }
}

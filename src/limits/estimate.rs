//! Tokens a call is charged at admission, before the provider says what it really used.
//!
//! The text a call sends (messages, prompt, input, instructions, tool arguments) is counted with
//! OpenAI's own tokenizer (`o200k_base` or `cl100k_base`, chosen from the model name) when the
//! model is an OpenAI one; for any other model it is estimated as one token per 4 bytes of text,
//! OpenAI's published rule of thumb. Each chat message adds 4 tokens of framing and a reply
//! 3 more, as OpenAI's counting guide does. The completion is charged up front only when the
//! caller caps it (`max_tokens`, `max_completion_tokens`, `max_output_tokens`). The charge is
//! corrected to the provider's `usage` once the answer is known.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
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
const CAP_KEYS: [&str; 4] = [
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    // Gemini's, in `generationConfig`.
    "maxOutputTokens",
];

/// Whether each tokenizer has been loaded. A tokenizer's tables take tens of MiB and a few
/// hundred milliseconds to load, so each is loaded on its first use (on the blocking pool), and
/// an installation without token limits never pays for them.
static O200K_LOADED: AtomicBool = AtomicBool::new(false);
static CL100K_LOADED: AtomicBool = AtomicBool::new(false);

/// A tokenizer: whether it is loaded, and its loader.
type Loader = (&'static AtomicBool, fn() -> &'static CoreBPE);

/// Which tokenizer counts `model`, if an OpenAI one does. The answer for the last model asked
/// is kept per thread: calls name the same few models again and again, and finding one costs a
/// hashed lookup and a scan of name prefixes, twice a call.
fn tokenizer_for(model: &str) -> Option<Loader> {
    thread_local! {
        static LAST: RefCell<Option<(String, Option<Loader>)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((name, loader)) if name == model => *loader,
        _ => {
            let loader = look_up(model);
            *last = Some((model.to_owned(), loader));
            loader
        }
    })
}

fn look_up(model: &str) -> Option<Loader> {
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
/// cap when it sets one; at most [`MOST_TOKENS`](super::MOST_TOKENS).
pub fn tokens(model: &str, body: &[u8]) -> i64 {
    let tokens = match tally(model, body) {
        Some(tally) => tally.prompt().saturating_add(tally.cap),
        None => bytes_estimate(body.len()),
    };
    tokens.min(super::MOST_TOKENS)
}

/// The prompt tokens of a JSON call body sent to `model`.
pub fn prompt_tokens(model: &str, body: &[u8]) -> i64 {
    match tally(model, body) {
        Some(tally) => tally.prompt(),
        None => bytes_estimate(body.len()),
    }
}

/// The tokens of a piece of text produced by `model`.
pub fn text_tokens(model: &str, text: &str) -> i64 {
    match bpe_for(model) {
        Some(bpe) => bpe.encode_ordinary(text).len() as i64,
        None => bytes_estimate(text.len()),
    }
}

/// One token per 4 bytes, rounded up.
fn bytes_estimate(len: usize) -> i64 {
    len.div_ceil(4) as i64
}

/// Reads a body once, counting as it goes: nothing of it is built.
fn tally(model: &str, body: &[u8]) -> Option<Tally> {
    let mut tally = Tally {
        bpe: bpe_for(model),
        ..Tally::default()
    };
    let mut reader = serde_json::Deserializer::from_slice(body);
    Walk {
        tally: &mut tally,
        place: Place::Top,
    }
    .deserialize(&mut reader)
    .ok()?;
    reader.end().ok()?;
    Some(tally)
}

/// What a body's walk counted.
#[derive(Default)]
struct Tally {
    bpe: Option<&'static CoreBPE>,
    /// Tokens of the text pieces.
    text: i64,
    /// The largest completion cap set.
    cap: i64,
    /// Chat messages, when the body has a `messages` array.
    messages: Option<i64>,
}

impl Tally {
    fn prompt(&self) -> i64 {
        self.text + self.messages.map_or(0, |n| 4 * n + 3)
    }

    fn add_text(&mut self, text: &str) {
        self.text += match self.bpe {
            Some(bpe) => counted::tokens(bpe, text),
            None => bytes_estimate(text.len()),
        };
    }
}

/// Where a value sits in the body, which decides what of it counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The body itself.
    Top,
    /// Gemini's `generationConfig`, which holds its cap.
    Config,
    /// Under one of `TEXT_KEYS`: strings are text, numbers pre-tokenised ids.
    Text,
    /// Anywhere else.
    Other,
}

/// Walks one value, adding what it holds to the tally. Arrays keep their place; an object's
/// values take the place their key gives them.
struct Walk<'t> {
    tally: &'t mut Tally,
    place: Place,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    /// The number of elements, when the value is an array.
    type Value = Option<i64>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = Option<i64>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        if self.place == Place::Text {
            self.tally.add_text(text);
        }
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        self.token_id()
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        self.token_id()
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        self.token_id()
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
        let place = match self.place {
            Place::Top | Place::Config => Place::Other,
            place => place,
        };
        let mut count = 0;
        while items
            .next_element_seed(Walk {
                tally: &mut *self.tally,
                place,
            })?
            .is_some()
        {
            count += 1;
        }
        Ok(Some(count))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            let place = match key {
                Key::Text => Place::Text,
                Key::Config if self.place == Place::Top => Place::Config,
                _ => Place::Other,
            };
            match (self.place, key) {
                (Place::Top | Place::Config, Key::Cap) => {
                    if let Some(cap) = map.next_value::<Cap>()?.0 {
                        self.tally.cap = self.tally.cap.max(cap);
                    }
                }
                (Place::Top, Key::Messages) => {
                    let walk = Walk {
                        tally: &mut *self.tally,
                        place,
                    };
                    if let Some(n) = map.next_value_seed(walk)? {
                        self.tally.messages = Some(n);
                    }
                }
                _ => {
                    map.next_value_seed(Walk {
                        tally: &mut *self.tally,
                        place,
                    })?;
                }
            }
        }
        Ok(None)
    }
}

impl Walk<'_> {
    /// A number under a text key: one element of a pre-tokenised `prompt` or `input`.
    fn token_id<E>(self) -> Result<Option<i64>, E> {
        if self.place == Place::Text {
            self.tally.text += 1;
        }
        Ok(None)
    }
}

/// What an object key means to the count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Text,
    Cap,
    Messages,
    Config,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(if TEXT_KEYS.contains(&key) {
                    Key::Text
                } else if CAP_KEYS.contains(&key) {
                    Key::Cap
                } else if key == "messages" {
                    Key::Messages
                } else if key == "generationConfig" {
                    Key::Config
                } else {
                    Key::Other
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A completion cap: its value when it is an integer that fits, nothing otherwise.
struct Cap(Option<i64>);

impl<'de> Deserialize<'de> for Cap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CapVisitor;
        impl<'de> Visitor<'de> for CapVisitor {
            type Value = Cap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a completion cap")
            }
            fn visit_i64<E>(self, n: i64) -> Result<Cap, E> {
                Ok(Cap(Some(n.max(0))))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Cap, E> {
                Ok(Cap(i64::try_from(n).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Cap, E> {
                Ok(Cap(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Cap, E> {
                Ok(Cap(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Cap, E> {
                Ok(Cap(None))
            }
            fn visit_unit<E>(self) -> Result<Cap, E> {
                Ok(Cap(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Cap, A::Error> {
                while items.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Cap(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cap, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Cap(None))
            }
        }
        deserializer.deserialize_any(CapVisitor)
    }
}

/// Token counts of texts seen lately, per thread. A conversation sends its whole history with
/// every call, and an application the same system prompt with each: counting each text once
/// spares the tokenizer (tens of nanoseconds a byte) all but the newest message.
mod counted {
    use std::cell::RefCell;
    use std::hash::BuildHasher;
    use std::num::NonZeroUsize;

    use lru::LruCache;
    use tiktoken_rs::CoreBPE;

    /// Texts remembered per thread: about 200 KiB.
    const REMEMBERED: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

    struct Memo {
        hasher: foldhash::fast::RandomState,
        counts: LruCache<u64, i64>,
    }

    thread_local! {
        static MEMO: RefCell<Memo> = RefCell::new(Memo {
            hasher: foldhash::fast::RandomState::default(),
            counts: LruCache::new(REMEMBERED),
        });
    }

    /// The tokens of `text` under `bpe`. A 64-bit hash of the text and the tokenizer stands for
    /// the text: two texts in one thread's memo sharing one has odds of about 1 in 10^12, and
    /// the count is an estimate corrected by the provider's usage anyway.
    pub(super) fn tokens(bpe: &'static CoreBPE, text: &str) -> i64 {
        MEMO.with_borrow_mut(|memo| {
            let key = memo
                .hasher
                .hash_one((std::ptr::from_ref(bpe) as usize, text));
            *memo
                .counts
                .get_or_insert(key, || bpe.encode_ordinary(text).len() as i64)
        })
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

    #[test]
    fn only_text_under_text_keys_counts_wherever_it_sits() {
        // `name` and `role` are not text; `description` and `arguments` are, at any depth.
        let body =
            br#"{"model":"m","messages":[{"role":"user","name":"abcdefgh","content":"abcd"}],
            "tools":[{"function":{"description":"abcdefgh","parameters":{"x":{"text":"abcd"}}}}],
            "metadata":{"prompt":["abcd",7,1.5,null,true]}}"#;
        // 1 + 2 + 1 tokens of text, 3 ids (7, 1.5 and nothing for null or true), 1 message.
        assert_eq!(tokens("other", body), 1 + 2 + 1 + 1 + 2 + 4 + 3);
    }

    #[test]
    fn caps_count_only_as_integers_at_the_top_or_in_gemini_config() {
        let t = |body: &[u8]| tokens("other", body);
        assert_eq!(t(br#"{"max_tokens":10,"max_output_tokens":30}"#), 30);
        assert_eq!(t(br#"{"max_tokens":-5}"#), 0);
        assert_eq!(t(br#"{"max_tokens":1.5}"#), 0);
        assert_eq!(t(br#"{"max_tokens":"10"}"#), 0);
        assert_eq!(t(br#"{"max_tokens":[10],"x":{"max_tokens":10}}"#), 0);
        assert_eq!(t(br#"{"max_tokens":18446744073709551615}"#), 0);
        // Gemini's cap sits in its `generationConfig`, and only there.
        assert_eq!(t(br#"{"generationConfig":{"maxOutputTokens":100}}"#), 100);
        assert_eq!(
            t(br#"{"x":{"generationConfig":{"maxOutputTokens":100}}}"#),
            0
        );
        assert_eq!(
            t(br#"{"generationConfig":{"x":{"maxOutputTokens":100}}}"#),
            0
        );
        // The largest cap that fits is charged, but never more than a window can sum.
        let most = br#"{"max_tokens":9223372036854775807,"messages":[{"content":"hi"}]}"#;
        assert_eq!(t(most), crate::limits::MOST_TOKENS);
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_estimated_from_bytes() {
        assert_eq!(tokens("other", b"not json at all"), 4);
        assert_eq!(tokens("other", br#"{"input":"abcd"} trailing"#), 7);
        // A top-level array is walked like any other value.
        assert_eq!(tokens("other", br#"[{"input":"abcdefgh"}]"#), 2);
        assert_eq!(prompt_tokens("other", br#"{"messages":"abcd"}"#), 0);
    }

    #[test]
    fn escaped_text_is_counted_as_the_text_it_stands_for() {
        // "caf\u00e9 \"x\"" is `café "x"`: 9 bytes.
        let body = br#"{"input":"caf\u00e9 \"x\""}"#;
        assert_eq!(tokens("other", body), 3);
    }

    #[test]
    fn a_remembered_count_is_the_tokenizers_count() {
        let text = "The same system prompt, sent with every call of a conversation.";
        let body = format!(r#"{{"messages":[{{"role":"system","content":"{text}"}}]}}"#);
        let first = tokens("gpt-4o", body.as_bytes());
        assert_eq!(first, text_tokens("gpt-4o", text) + 4 + 3);
        assert_eq!(tokens("gpt-4o", body.as_bytes()), first);
        // The same text under another tokenizer is counted by that one.
        let cl100k = tokens("gpt-4", body.as_bytes());
        assert_eq!(cl100k, text_tokens("gpt-4", text) + 4 + 3);
    }
}

//! Stored responses stay with the key that created them. OpenAI keeps a `/v1/responses`
//! answer in the key's project, and a follow-up that names it (`previous_response_id`) is
//! answered only through a key of that project: from a pool of keys of several projects, round
//! robin would send it elsewhere and the caller would get "previous response not found".
//! So the id of each response is noted with the key that created it, in this replica's memory
//! and (with Redis) for the other replicas, and a follow-up is sent to that key first.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use crate::auth::SharedCache;

/// Responses remembered per replica (a few hundred bytes each).
const REMEMBERED: usize = 100_000;

/// How much of an answer's start is searched for its id: a response's id is its first field,
/// and a stream's first event (`response.created`) carries it.
pub const ID_WITHIN: usize = 8 * 1024;

pub struct ResponseAffinity {
    local: Mutex<LruCache<String, String>>,
    shared: Arc<SharedCache>,
}

impl ResponseAffinity {
    pub fn new(shared: Arc<SharedCache>) -> Self {
        ResponseAffinity {
            local: Mutex::new(LruCache::new(
                NonZeroUsize::new(REMEMBERED).expect("not zero"),
            )),
            shared,
        }
    }

    /// Notes that `key_id` created the response `response_id`.
    pub fn remember(&self, response_id: &str, key_id: &str) {
        self.local
            .lock()
            .put(response_id.to_owned(), key_id.to_owned());
        self.shared.remember_response_key(response_id, key_id);
    }

    /// The key that created `response_id`, if this replica or (through Redis) another noted it.
    pub async fn key_for(&self, response_id: &str) -> Option<String> {
        if let Some(key) = self.local.lock().get(response_id) {
            return Some(key.clone());
        }
        let key = self.shared.response_key(response_id).await?;
        self.local.lock().put(response_id.to_owned(), key.clone());
        Some(key)
    }
}

/// The value of the first `"id"` member in `text` (the start of a Responses answer or event
/// stream), once it has arrived whole.
pub fn first_id(text: &[u8]) -> Option<&str> {
    let mut rest = text;
    while let Some(at) = memchr::memmem::find(rest, b"\"id\"") {
        let after = &rest[at + 4..];
        let after = trim_start(after);
        if let Some(value) = after.strip_prefix(b":") {
            let value = trim_start(value);
            let value = value.strip_prefix(b"\"")?;
            let end = memchr::memchr(b'"', value)?;
            return std::str::from_utf8(&value[..end])
                .ok()
                .filter(|id| !id.is_empty() && !id.contains('\\'));
        }
        rest = after;
    }
    None
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let skip = bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &bytes[skip..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_id_of_an_answer_or_a_stream_is_found() {
        assert_eq!(
            first_id(br#"{"id": "resp_1", "object": "response", "output": [{"id": "msg_2"}]}"#),
            Some("resp_1")
        );
        let stream = b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_9\",\"object\":\"response\"}}\n\n";
        assert_eq!(first_id(stream), Some("resp_9"));
        // Not whole yet: wait for more.
        assert_eq!(first_id(br#"{"id": "resp_"#), None);
        assert_eq!(first_id(br#"{"object": "response"}"#), None);
        // A key named "id" is a member only when a colon follows.
        assert_eq!(
            first_id(br#"{"x": "\"id\"", "id": "resp_3"}"#),
            Some("resp_3")
        );
    }
}

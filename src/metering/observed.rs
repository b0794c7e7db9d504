//! What was relayed of one answer, copied so the usage can be read off it later, in the
//! background: the whole body of a JSON answer, and a stream's events (all of them up to a
//! bound, then only its last few KiB, where the usage event sits). A JSON answer past the bound
//! (images as base64) keeps its last few KiB too, where OpenAI puts `usage`, and a count of the
//! images it carried. Copied, not referenced: a relayed chunk is a slice of the connection's
//! read buffer, and holding it would hold that whole buffer until the accountant is done.

use actix_web::web::Bytes;

/// Largest JSON answer, or stream prefix, kept whole.
const MAX_KEPT: usize = 4 * 1024 * 1024;
/// Bytes of a long answer's end kept once it outgrew `MAX_KEPT`.
const STREAM_TAIL: usize = 16 * 1024;
/// The key of each image in an images answer sent as base64, counted in answers too large to
/// keep.
const IMAGE_KEY: &[u8] = b"\"b64_json\"";

/// How an answer's relay ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// No answer was relayed (every upstream failed, or the call was refused).
    #[default]
    NotStarted,
    /// Still relaying when it was dropped: the client went away.
    ClientGone,
    /// The upstream broke off, went silent or ended a stream without its closing event.
    Broken,
    /// Relayed to the end.
    Complete,
}

/// What was relayed of one answer.
#[derive(Debug, Default)]
pub struct Observed {
    /// The provider's status, once it answered.
    pub status: Option<u16>,
    /// Whether the answer is a server-sent-event stream.
    pub stream: bool,
    /// Whether the body is text worth keeping (JSON, SSE, subtitles), not audio or images.
    keep: bool,
    kept: Vec<u8>,
    /// The start of the body was dropped: only its last few KiB are kept.
    pub truncated: bool,
    /// Images (`"b64_json"` keys) in a JSON answer too large to keep whole.
    pub images_seen: i64,
    pub ending: Ending,
}

impl Observed {
    /// The upstream answered with `status`.
    pub fn begin(&mut self, status: u16, stream: bool, keep: bool) {
        self.status = Some(status);
        self.stream = stream;
        self.keep = keep;
        self.ending = Ending::ClientGone;
    }

    /// Whether the provider answered 2xx.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// Keeps a reference to a relayed chunk.
    pub fn push(&mut self, chunk: &Bytes) {
        if !self.keep || chunk.is_empty() {
            return;
        }
        // Where images not counted yet may start: all of the body the first time it outgrows
        // the bound, then the new chunk and the few bytes before it a key may straddle.
        let unseen = match self.truncated {
            false => 0,
            true => self.kept.len().saturating_sub(IMAGE_KEY.len() - 1),
        };
        self.kept.extend_from_slice(chunk);
        if self.kept.len() <= MAX_KEPT && !self.truncated {
            return;
        }
        self.truncated = true;
        if !self.stream {
            let found = memchr::memmem::find_iter(&self.kept[unseen..], IMAGE_KEY).count();
            self.images_seen += found as i64;
        }
        // Keep the newest bytes only.
        let excess = self.kept.len().saturating_sub(STREAM_TAIL);
        self.kept.drain(..excess);
    }

    /// The relay reached its end (`complete`) or broke off.
    pub fn end(&mut self, complete: bool) {
        self.ending = if complete {
            Ending::Complete
        } else {
            Ending::Broken
        };
    }

    /// Whether the answer was cut short, by either side.
    pub fn partial(&self) -> bool {
        matches!(self.ending, Ending::ClientGone | Ending::Broken)
    }

    /// The kept body.
    pub fn body(&self) -> &[u8] {
        &self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_streams_keep_their_tail() {
        let mut o = Observed::default();
        o.begin(200, true, true);
        let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
        for _ in 0..6 {
            o.push(&chunk);
        }
        o.push(&Bytes::from_static(b"data: end\n\n"));
        assert!(o.truncated);
        assert!(o.body().ends_with(b"data: end\n\n"));
        assert!(o.body().len() <= 16 * 1024);
    }

    #[test]
    fn huge_json_answers_keep_their_tail_and_count_their_images() {
        let mut o = Observed::default();
        o.begin(200, false, true);
        let image = |n: usize| {
            let mut entry = br#"{"b64_json":""#.to_vec();
            entry.extend(std::iter::repeat_n(b'A', n));
            entry.extend_from_slice(br#""},"#);
            entry
        };
        o.push(&Bytes::from_static(br#"{"created":1,"data":["#));
        for _ in 0..3 {
            // Split inside the key, so a count must see across chunks.
            let entry = image(2 * 1024 * 1024);
            o.push(&Bytes::copy_from_slice(&entry[..5]));
            o.push(&Bytes::copy_from_slice(&entry[5..]));
        }
        o.push(&Bytes::from_static(br#"{}],"usage":{"input_tokens":1}}"#));
        assert!(o.truncated);
        assert_eq!(o.images_seen, 3);
        assert!(o.body().ends_with(br#""usage":{"input_tokens":1}}"#));
        assert!(o.body().len() <= 16 * 1024);
    }

    #[test]
    fn audio_is_not_kept() {
        let mut o = Observed::default();
        o.begin(200, false, false);
        o.push(&Bytes::from_static(b"ID3..."));
        assert!(o.body().is_empty());
        assert_eq!(o.ending, Ending::ClientGone);
        o.end(true);
        assert!(!o.partial());
    }
}

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
    /// Where the last two events of a stream end in `kept` (after their blank line; the start
    /// of the stream counts as an end), while still kept: the last complete event lies between
    /// them.
    event_ends: [Option<usize>; 2],
    pub ending: Ending,
}

impl Observed {
    /// The upstream answered with `status`.
    pub fn begin(&mut self, status: u16, stream: bool, keep: bool) {
        self.event_ends = [Some(0), Some(0)];
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
        let appended = self.kept.len();
        self.kept.extend_from_slice(chunk);
        if self.stream {
            self.note_event_ends(appended);
        }
        if self.kept.len() <= MAX_KEPT && !self.truncated {
            return;
        }
        self.truncated = true;
        if !self.stream {
            let found = memchr::memmem::find_iter(&self.kept[unseen..], IMAGE_KEY).count();
            self.images_seen += found as i64;
        }
        // Keep the newest bytes only, but a stream's last complete event whole while it fits
        // the bound: a Responses stream's `response.completed` repeats the whole output ahead
        // of its usage.
        let mut cut = self.kept.len().saturating_sub(STREAM_TAIL);
        if let Some(last_event) = self.event_ends[0].filter(|_| self.stream) {
            if last_event < cut && self.kept.len() - last_event <= MAX_KEPT {
                cut = last_event;
            }
        }
        self.kept.drain(..cut);
        self.event_ends = self
            .event_ends
            .map(|end| end.and_then(|end| end.checked_sub(cut)));
    }

    /// Notes the ends of events (a blank line) in what was appended from `from` on.
    fn note_event_ends(&mut self, from: usize) {
        // A blank line split by the chunk boundary starts a byte or two before it.
        let start = from.saturating_sub(2);
        for blank in [&b"\n\n"[..], b"\n\r\n"] {
            for at in memchr::memmem::find_iter(&self.kept[start..], blank) {
                let end = start + at + blank.len();
                if self.event_ends[1].is_none_or(|last| end > last) {
                    self.event_ends = [self.event_ends[1], Some(end)];
                }
            }
        }
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
    fn a_long_streams_large_last_event_is_kept_whole() {
        let mut o = Observed::default();
        o.begin(200, true, true);
        let delta = Bytes::from_static(b"event: d\ndata: {\"delta\":\"xxxxxxxxxxxxxxxx\"}\n\n");
        for _ in 0..(5 * 1024 * 1024 / delta.len()) {
            o.push(&delta);
        }
        let mut last = b"event: response.completed\ndata: {\"text\":\"".to_vec();
        last.extend(std::iter::repeat_n(b'y', 100 * 1024));
        last.extend_from_slice(b"\",\"usage\":{}}\n\n");
        // Split within its blank line, so the event's end is found across chunks.
        o.push(&Bytes::copy_from_slice(&last[..last.len() - 1]));
        o.push(&Bytes::copy_from_slice(&last[last.len() - 1..]));
        assert!(o.truncated);
        assert!(
            o.body().starts_with(b"event: response.completed"),
            "kept from the event's start"
        );
        assert!(o.body().ends_with(&last));
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

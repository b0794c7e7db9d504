//! What was relayed of one answer, kept by reference (the relay's own `Bytes`, no copies) so the
//! usage can be read off it later, in the background: the whole body of a JSON answer, and a
//! stream's events (all of them up to a bound, then only its last few KiB, where the usage
//! event sits).

use actix_web::web::Bytes;

/// Largest JSON answer, or stream prefix, kept whole.
const MAX_KEPT: usize = 4 * 1024 * 1024;
/// Bytes of a long stream's end kept once it outgrew `MAX_KEPT`.
const STREAM_TAIL: usize = 16 * 1024;

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
    chunks: Vec<Bytes>,
    kept: usize,
    /// The start of the body was dropped (a long stream) or all of it (a huge JSON answer).
    pub truncated: bool,
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
        self.chunks.push(chunk.clone());
        self.kept += chunk.len();
        if self.kept <= MAX_KEPT && !self.truncated {
            return;
        }
        self.truncated = true;
        if self.stream {
            // Keep the newest chunks only, but never fewer than one.
            let mut drop = 0;
            while self.kept > STREAM_TAIL && drop + 1 < self.chunks.len() {
                self.kept -= self.chunks[drop].len();
                drop += 1;
            }
            self.chunks.drain(..drop);
        } else {
            self.chunks.clear();
            self.kept = 0;
            self.keep = false;
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

    /// The kept body as one contiguous slice (copied only when it came in several chunks).
    pub fn body(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.chunks.as_slice() {
            [] => std::borrow::Cow::Borrowed(&[]),
            [one] => std::borrow::Cow::Borrowed(one),
            many => std::borrow::Cow::Owned(many.iter().flat_map(|c| c.iter().copied()).collect()),
        }
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
        assert!(o.body().len() <= 1024 * 1024 + 64);
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

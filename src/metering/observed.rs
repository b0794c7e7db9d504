//! What was relayed of one answer, copied so the usage can be read off it later, in the
//! background: the whole body of a JSON answer, and a stream's events (all of them up to a
//! bound, then only its last few KiB, where the usage event sits). Copied, not referenced: a
//! relayed chunk is a slice of the connection's read buffer, and holding it would hold that
//! whole buffer until the accountant is done.

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
    kept: Vec<u8>,
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
        self.kept.extend_from_slice(chunk);
        if self.kept.len() <= MAX_KEPT && !self.truncated {
            return;
        }
        self.truncated = true;
        if self.stream {
            // Keep the newest bytes only.
            let excess = self.kept.len().saturating_sub(STREAM_TAIL);
            self.kept.drain(..excess);
        } else {
            self.kept = Vec::new();
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

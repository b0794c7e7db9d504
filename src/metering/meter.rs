//! `CallMeter`: follows one data-plane call from its start to the last byte relayed, and hands
//! its record to the recorder when it is dropped, however the call ended: refused, failed,
//! relayed to the end, broken off upstream, or abandoned by a client that went away.

use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use actix_web::web::Bytes;
use actix_web::HttpRequest;

use super::observed::Observed;
use super::record::{CallRecord, Recorder};
use super::usage::{self, Endpoint};
use crate::actors::rate_limiter::{RateLimiterActor, Settle};
use crate::auth::Principal;
use crate::domain::now;
use crate::error::ApiError;
use crate::limits::Ticket;
use crate::telemetry::request_id_of;

/// A call being metered.
pub struct CallMeter {
    record: Option<CallRecord>,
    started: Instant,
    recorder: Arc<Recorder>,
    /// A token-limit charge to settle with the usage the answer reports.
    settle: Option<(Ticket, Addr<RateLimiterActor>)>,
}

impl CallMeter {
    /// Starts metering the call `req` made by `principal`.
    pub fn start(req: &HttpRequest, principal: &Principal, recorder: Arc<Recorder>) -> Self {
        let request_id = match request_id_of(req) {
            Some(id) => id.as_str().to_owned(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let endpoint = Endpoint::of(req.match_info().as_str());
        recorder.opened();
        CallMeter {
            record: Some(CallRecord {
                request_id,
                ts: now(),
                user_id: principal.user.id.clone(),
                key_id: principal.key_id.clone(),
                route: route_name(req.match_info().as_str()),
                endpoint,
                model: None,
                upstream_model: None,
                upstream_key_id: None,
                level: None,
                status: 0,
                error_code: None,
                attempts: 0,
                failures: Vec::new(),
                latency: Default::default(),
                ttfb: None,
                observed: Observed::default(),
                request: Bytes::new(),
                reported: None,
            }),
            started: Instant::now(),
            recorder,
            settle: None,
        }
    }

    /// The kind of call, from its route.
    pub fn endpoint(&self) -> Endpoint {
        self.record.as_ref().map_or(Endpoint::Other, |r| r.endpoint)
    }

    fn record(&mut self) -> &mut CallRecord {
        self.record
            .as_mut()
            .expect("a meter records until it is dropped")
    }

    /// The call was read: the model asked for, the one sent, and the body, which is kept only
    /// where the usage needs it (images asked, characters spoken, the prompt of a stream that
    /// may be cut before its usage arrives).
    pub fn call(&mut self, model: &str, upstream_model: &str, body: &Bytes, stream: bool) {
        let record = self.record();
        record.model = Some(model.to_owned());
        record.upstream_model = Some(upstream_model.to_owned());
        if stream || matches!(record.endpoint, Endpoint::Images | Endpoint::Speech) {
            record.request = body.clone();
        }
    }

    /// Settles `ticket` with the answer's usage when the call ends.
    pub fn settle_with(&mut self, ticket: Ticket, actor: Addr<RateLimiterActor>) {
        self.settle = Some((ticket, actor));
    }

    /// The attempts made, the key (and level) that answered, and the attempts that failed.
    pub fn attempts(
        &mut self,
        attempts: u32,
        answered_by: Option<(&str, i32)>,
        failures: Vec<(String, &'static str)>,
    ) {
        let record = self.record();
        record.attempts = attempts;
        if let Some((key, level)) = answered_by {
            record.upstream_key_id = Some(key.to_owned());
            record.level = Some(level);
        }
        record.failures = failures;
    }

    /// Switchyard answered the call itself with an error.
    pub fn refused(&mut self, error: &ApiError) {
        let record = self.record();
        record.status = error.status().as_u16();
        record.error_code = Some(error.code());
    }

    /// The provider answered with `status`; `keep` says whether its body is text worth keeping.
    pub fn begin(&mut self, status: u16, stream: bool, keep: bool) {
        let record = self.record();
        record.status = status;
        record.observed.begin(status, stream, keep);
    }

    /// A chunk went to the client.
    pub fn push(&mut self, chunk: &Bytes) {
        let elapsed = self.started.elapsed();
        let record = self.record();
        record.ttfb.get_or_insert(elapsed);
        record.observed.push(chunk);
    }

    /// The relay ended: reached its end (`complete`) or broke off.
    pub fn end(&mut self, complete: bool) {
        self.record().observed.end(complete);
    }
}

/// The status logged for a call whose client left before any answer.
const CLIENT_CLOSED: u16 = 499;

impl Drop for CallMeter {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        record.latency = self.started.elapsed();
        if record.status == 0 {
            // Nothing answered the client: it left first (or the server stopped first), which
            // nginx logs as 499.
            record.status = CLIENT_CLOSED;
        }
        if let Some((ticket, actor)) = self.settle.take() {
            // Read here, on the request thread, so that the record reaches the recorder now,
            // even if this worker stops before its actor runs; the settlement may be lost then,
            // with the window it corrects.
            record.reported = usage::reported(record.endpoint, &record.observed);
            actor.do_send(Settle {
                ticket,
                actual: record.reported.as_ref().map(usage::Usage::total_tokens),
                succeeded: record.observed.succeeded(),
            });
        }
        self.recorder.push(record);
    }
}

/// The route of a data-plane path, as a static name for logs and metric labels.
fn route_name(path: &str) -> &'static str {
    if let Some(target) = path.strip_prefix("/v1beta/models/") {
        return match target.rsplit_once(':') {
            Some((_, "generateContent")) => "/v1beta/models/{model}:generateContent",
            Some((_, "streamGenerateContent")) => "/v1beta/models/{model}:streamGenerateContent",
            _ => "other",
        };
    }
    const ROUTES: [&str; 9] = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/messages",
    ];
    ROUTES.into_iter().find(|r| *r == path).unwrap_or("other")
}

//! The access gate every call passes after authentication, in DESIGN.md's order: IP allowlist,
//! user status, spend limit, model ACL, endpoint ACL (rate limits follow, in `limits`).

pub mod client_ip;
pub mod rules;

use std::net::IpAddr;

use actix_web::http::StatusCode;
use actix_web::HttpRequest;
use ipnet::IpNet;

use crate::auth::Principal;
use crate::domain::UserStatus;
use crate::error::ApiError;
use crate::metering::spend::SpendBook;

/// Where calls come from: the one setting the checks need beyond the user's rules.
pub struct Gate {
    trusted_proxies: Vec<IpNet>,
}

impl Gate {
    /// A gate believing `X-Forwarded-For` only from `trusted_proxies`.
    pub fn new(trusted_proxies: Vec<IpNet>) -> Self {
        Gate { trusted_proxies }
    }

    /// The address the call comes from (see [`client_ip::resolve`]).
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        if self.trusted_proxies.is_empty() {
            return Some(peer.to_canonical());
        }
        // Read whole, bytes that are not text included: a header left out for one byte a client
        // wrote would leave the proxy's own address as the client's. Such bytes make a hop that
        // is no address, and a caller whose nearest hop is one matches no allowlist.
        let forwarded: Vec<_> = req
            .headers()
            .get_all("x-forwarded-for")
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        client_ip::resolve(
            peer,
            forwarded.iter().map(|v| v.as_ref()),
            &self.trusted_proxies,
        )
    }
}

/// What applies to every route of the data plane: the IP allowlist, then the user's status.
pub fn admit_caller(client_ip: Option<IpAddr>, principal: &Principal) -> Result<(), ApiError> {
    if !principal.rules.allows_ip(client_ip) {
        let shown = client_ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        return Err(ApiError::forbidden(
            "ip_not_allowed",
            format!("calls from {shown} are not allowed for this key"),
        ));
    }
    if principal.user.status == UserStatus::Suspended {
        return Err(ApiError::user_suspended());
    }
    Ok(())
}

/// What applies to a call for a model: the spend limit (against the spend the accountant keeps),
/// the model ACL, then the endpoint ACL.
pub fn admit_call(
    principal: &Principal,
    spend: &SpendBook,
    path: &str,
    model: &str,
) -> Result<(), ApiError> {
    let user = &principal.user;
    if let Some(limit) = user.spend_limit_nanos {
        if spend.spent(&user.id, user.spent_nanos) >= limit {
            return Err(ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "budget_exceeded",
                "this user's spend limit is reached",
            ));
        }
    }
    if !principal.rules.allows_model(model) {
        return Err(ApiError::forbidden(
            "model_not_allowed",
            "this key may not use the requested model",
        ));
    }
    admit_endpoint(principal, path)
}

/// The endpoint ACL alone, for routes that name no model (`GET /v1/models`).
pub fn admit_endpoint(principal: &Principal, path: &str) -> Result<(), ApiError> {
    if principal.rules.allows_endpoint(path) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "endpoint_not_allowed",
            format!("this key may not call {path}"),
        ))
    }
}

//! The admin API under `/admin`, guarded by the admin token.

pub mod mappings;
pub mod prices;
pub mod upstream_keys;
pub mod usage;
pub mod user_keys;
pub mod users;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, Error, ResponseError};
use chrono::{NaiveDateTime, SecondsFormat};
use serde::{Deserialize, Deserializer, Serialize};

use crate::crypto;
use crate::db::repo::Page;
use crate::error::ApiError;
use crate::state::AppState;

/// Every admin route, behind [`require_admin_token`].
pub fn scope() -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = Error,
        InitError = (),
    >,
> {
    web::scope("/admin")
        .wrap(from_fn(require_admin_token))
        .service(web::resource("/users").post(users::create).get(users::list))
        .service(
            web::resource("/users/{id}")
                .get(users::get)
                .patch(users::update)
                .delete(users::delete),
        )
        .service(
            web::resource("/users/{id}/keys")
                .post(user_keys::create)
                .get(user_keys::list),
        )
        .service(web::resource("/keys/{id}").delete(user_keys::revoke))
        .service(web::resource("/upstream-keys/discover").post(upstream_keys::discover))
        .service(
            web::resource("/upstream-keys")
                .post(upstream_keys::create)
                .get(upstream_keys::list),
        )
        .service(
            web::resource("/upstream-keys/{id}")
                .get(upstream_keys::get)
                .patch(upstream_keys::update)
                .delete(upstream_keys::delete),
        )
        .service(
            web::resource("/model-mappings")
                .post(mappings::create)
                .get(mappings::list),
        )
        .service(web::resource("/model-mappings/{id}").delete(mappings::delete))
        .service(web::resource("/prices").get(prices::list))
        .service(web::resource("/prices/{model:.+}").put(prices::put))
        .service(web::resource("/usage").get(usage::summary))
        .service(web::resource("/logs").get(usage::logs))
}

/// Refuses any admin call without the configured token, compared in constant time.
async fn require_admin_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    match check_admin_token(&req) {
        Ok(()) => next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body),
        Err(err) => Ok(req
            .into_response(err.error_response())
            .map_into_right_body()),
    }
}

fn check_admin_token(req: &ServiceRequest) -> Result<(), ApiError> {
    let expected = req
        .app_data::<web::Data<AppState>>()
        .and_then(|state| state.admin_token.as_deref())
        .ok_or_else(|| {
            ApiError::invalid_admin_token("the admin API is disabled: set SWITCHYARD_ADMIN_TOKEN")
        })?;
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::invalid_admin_token(
                "missing admin token: send `Authorization: Bearer <SWITCHYARD_ADMIN_TOKEN>`",
            )
        })?;
    if crypto::constant_time_eq(presented, expected) {
        Ok(())
    } else {
        Err(ApiError::invalid_admin_token("invalid admin token"))
    }
}

/// `?limit=&offset=` of list routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default, deserialize_with = "blank_as_none")]
    pub limit: Option<i64>,
    #[serde(default, deserialize_with = "blank_as_none")]
    pub offset: Option<i64>,
}

/// A query parameter given empty (`?user_id=&limit=`, as forms and URL templates send them)
/// is read as left out, not refused or matched as an empty string.
pub fn blank_as_none<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match Option::<String>::deserialize(de)? {
        Some(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}"))),
        _ => Ok(None),
    }
}

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1_000;

impl ListQuery {
    /// The page asked for, checked.
    pub fn page(&self) -> Result<Page, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        let offset = self.offset.unwrap_or(0);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        if offset < 0 {
            return Err(ApiError::invalid("offset must not be negative"));
        }
        Ok(Page { limit, offset })
    }
}

/// A list answer: `{"data": [...], "has_more": bool}`.
#[derive(Serialize)]
pub struct ListResponse<T: Serialize> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
}

impl<T: Serialize> ListResponse<T> {
    /// Wraps a page of records.
    pub fn new(data: Vec<T>, has_more: bool) -> Self {
        ListResponse {
            object: "list",
            data,
            has_more,
        }
    }
}

/// RFC 3339 UTC, as every admin time is shown.
pub fn rfc3339(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Reads an RFC 3339 time from a request, as UTC.
pub fn parse_time(field: &str, text: &str) -> Result<NaiveDateTime, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.naive_utc())
        .map_err(|_| ApiError::invalid(format!("{field} must be an RFC 3339 time")))
}

/// How often a PATCH reads and applies again when another change landed between its read and
/// its write.
const PATCH_ATTEMPTS: usize = 16;

/// Runs a PATCH as read, change, write-if-unchanged: `attempt` reads the record, applies the
/// change and writes it only where the record's `updated_at` is still the one it read,
/// answering `None` when it was not. Two PATCHes of different fields at the same moment then
/// both land; a blind write of every column would put back the other's old values (a
/// suspension lifted by a concurrent rename).
pub async fn patch_until_written<T, Fut>(mut attempt: impl FnMut() -> Fut) -> Result<T, ApiError>
where
    Fut: std::future::Future<Output = Result<Option<T>, ApiError>>,
{
    for _ in 0..PATCH_ATTEMPTS {
        if let Some(written) = attempt().await? {
            return Ok(written);
        }
    }
    Err(ApiError::conflict(
        "the record kept changing while this change was applied; send it again",
    ))
}

/// For PATCH fields that may be set to null: absent is `None`, null is `Some(None)`.
pub fn double_option<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// For fields that may be left out but have no null: absent is `None`, null is refused, where
/// it would otherwise read as absent and a PATCH meant to clear a list would answer 200 and
/// change nothing (an empty list clears one).
pub fn not_null<'de, T, D>(de: D) -> Result<Option<T>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    match Option::<T>::deserialize(de)? {
        Some(value) => Ok(Some(value)),
        None => Err(serde::de::Error::custom(
            "a field that cannot be null was given as null: leave it out to keep its value \
             (an empty list clears a list)",
        )),
    }
}

/// Answers 400 with `message` when `check` failed.
pub fn check(result: Result<(), String>) -> Result<(), ApiError> {
    result.map_err(ApiError::invalid)
}

/// Reads a JSON body that may be left out entirely (an empty body means all defaults).
pub fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Ok(T::default()),
        // An array would be read as the fields in order (see `JsonObject`).
        Some(b'{') => {}
        Some(_) => return Err(ApiError::invalid("request body must be a JSON object")),
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(crate::routes::describe_json_error(&e)))
}

//! `/admin/usage` (sums of usage and cost per model, user or day) and `/admin/logs` (one entry
//! per client call, newest first).

use actix_web::{web, HttpResponse};
use chrono::{NaiveDate, NaiveDateTime};
use serde::{Deserialize, Serialize};

use super::{blank_as_none, parse_time, rfc3339, ListQuery, ListResponse};
use crate::db::models::LogRow;
use crate::db::repo;
use crate::db::repo::logs::LogFilter;
use crate::db::repo::usage::{GroupBy, UsageFilter, UsageGroup};
use crate::domain::money::nanos_to_usd;
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /admin/usage` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    #[serde(default, deserialize_with = "blank_as_none")]
    user_id: Option<String>,
    #[serde(default, deserialize_with = "blank_as_none")]
    since: Option<String>,
    #[serde(default, deserialize_with = "blank_as_none")]
    until: Option<String>,
    #[serde(default, deserialize_with = "blank_as_none")]
    group_by: Option<String>,
    #[serde(default, deserialize_with = "blank_as_none")]
    limit: Option<i64>,
    #[serde(default, deserialize_with = "blank_as_none")]
    offset: Option<i64>,
}

/// One group of `/admin/usage`, keyed by `model`, `user_id` or `day`.
#[derive(Debug, Serialize)]
pub struct UsageView {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<String>,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    reasoning_tokens: i64,
    cached_tokens: i64,
    cost_usd: f64,
}

impl UsageView {
    fn new(group: UsageGroup, by: GroupBy) -> Self {
        let key = Some(group.key);
        UsageView {
            model: key.clone().filter(|_| by == GroupBy::Model),
            user_id: key.clone().filter(|_| by == GroupBy::User),
            day: key.filter(|_| by == GroupBy::Day),
            requests: group.requests,
            prompt_tokens: group.prompt_tokens,
            completion_tokens: group.completion_tokens,
            reasoning_tokens: group.reasoning_tokens,
            cached_tokens: group.cached_tokens,
            cost_usd: nanos_to_usd(group.cost_nanos),
        }
    }
}

/// A bound of a time range: an RFC 3339 time, or a day (`2026-11-24`, its midnight UTC).
fn parse_bound(field: &str, text: &str) -> Result<NaiveDateTime, ApiError> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).unwrap_or_default());
    }
    parse_time(field, text).map_err(|_| {
        ApiError::invalid(format!(
            "{field} must be an RFC 3339 time or a YYYY-MM-DD day"
        ))
    })
}

/// `GET /admin/usage?user_id=&since=&until=&group_by=model|user|day&limit=&offset=` (`since`
/// inclusive, `until` exclusive; grouped by model when `group_by` is absent). Every group is
/// listed unless `limit` or `offset` asks for a page.
pub async fn summary(
    state: web::Data<AppState>,
    query: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let by = match query.group_by.as_deref().unwrap_or("model") {
        "model" => GroupBy::Model,
        "user" => GroupBy::User,
        "day" => GroupBy::Day,
        _ => return Err(ApiError::invalid("group_by must be model, user or day")),
    };
    let filter = UsageFilter {
        user_id: query.user_id,
        since: query.since.map(|t| parse_bound("since", &t)).transpose()?,
        until: query.until.map(|t| parse_bound("until", &t)).transpose()?,
    };
    let paged = query.limit.is_some() || query.offset.is_some();
    let page = ListQuery {
        limit: query.limit,
        offset: query.offset,
    }
    .page()?;
    let groups = repo::usage::summary(&state.db, &filter, by).await?;
    let (skip, take) = match paged {
        true => (page.offset as usize, page.limit as usize),
        false => (0, groups.len()),
    };
    let more = groups.len() > skip.saturating_add(take);
    let views = groups
        .into_iter()
        .skip(skip)
        .take(take)
        .map(|g| UsageView::new(g, by))
        .collect();
    Ok(HttpResponse::Ok().json(ListResponse::new(views, more)))
}

/// `GET /admin/logs` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    #[serde(default, deserialize_with = "blank_as_none")]
    user_id: Option<String>,
    #[serde(default, deserialize_with = "blank_as_none")]
    status: Option<i32>,
    #[serde(default, deserialize_with = "blank_as_none")]
    limit: Option<i64>,
    #[serde(default, deserialize_with = "blank_as_none")]
    offset: Option<i64>,
}

/// One client call as `/admin/logs` shows it: ids, models, the key that answered, timings,
/// tokens and cost. Never a secret, never a prompt.
#[derive(Debug, Serialize)]
pub struct LogView {
    id: String,
    object: &'static str,
    ts: String,
    user_id: Option<String>,
    key_id: Option<String>,
    route: String,
    model: Option<String>,
    upstream_model: Option<String>,
    upstream_key_id: Option<String>,
    level: Option<i32>,
    status: i32,
    error_code: Option<String>,
    attempts: i32,
    latency_ms: i64,
    ttfb_ms: Option<i64>,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_usd: f64,
    partial: bool,
}

impl From<LogRow> for LogView {
    fn from(r: LogRow) -> Self {
        LogView {
            id: r.id,
            object: "request_log",
            ts: rfc3339(r.ts),
            user_id: r.user_id,
            key_id: r.key_id,
            route: r.route,
            model: r.model,
            upstream_model: r.upstream_model,
            upstream_key_id: r.upstream_key_id,
            level: r.level,
            status: r.status,
            error_code: r.error_code,
            attempts: r.attempts,
            latency_ms: r.latency_ms,
            ttfb_ms: r.ttfb_ms,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cost_usd: nanos_to_usd(r.cost_nanos),
            partial: r.partial,
        }
    }
}

/// `GET /admin/logs?user_id=&status=&limit=&offset=`, newest first.
pub async fn logs(
    state: web::Data<AppState>,
    query: web::Query<LogsQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let page = ListQuery {
        limit: query.limit,
        offset: query.offset,
    }
    .page()?;
    let filter = LogFilter {
        user_id: query.user_id,
        status: query.status,
    };
    let (rows, more) = repo::logs::list(&state.db, &filter, page).await?;
    let views = rows.into_iter().map(LogView::from).collect();
    Ok(HttpResponse::Ok().json(ListResponse::new(views, more)))
}

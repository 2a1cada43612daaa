//! The order endpoints: save, create, read, list, history and status change.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use domain::{HistoryEntry, OrderFull, OrderId, OrderSummary, OrderView, StatusChange};
use serde::{Deserialize, Serialize};
use store::saga::ChainStep;
use store::{CreateOutcome, Cursor, ListFilter, RequestHash, SaveContext, Saved};
use utoipa::{IntoParams, ToSchema};

use crate::extract::{self, JsonBody, PathId, QueryParams};
use crate::{ApiError, AppState, Problem};

const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

fn location(id: &str) -> HeaderValue {
    // Order ids are restricted to URL-safe characters.
    HeaderValue::from_str(&format!("/api/v1/orders/{id}")).expect("ids are URL-safe")
}

fn view_response(status: StatusCode, view: &OrderView) -> Response {
    let mut res = (status, Json(view)).into_response();
    res.headers_mut().insert(header::ETAG, etag(view.version));
    if status == StatusCode::CREATED {
        res.headers_mut()
            .insert(header::LOCATION, location(&view.full.order.id));
    }
    res
}

/// Puts what this replica committed in its cache, so its own next read
/// is never older than its own write.
fn remember(state: &AppState, snapshot: Option<order_cache::Snapshot>, view: &OrderView) {
    if let (Some(cache), Some(snapshot)) = (&state.cache, snapshot) {
        cache.fill(snapshot, view);
    }
}

/// Who saves, and the trace the save belongs to: the request span's, which
/// continues the caller's `traceparent`. Without a tracing layer (the API
/// used as a library) the caller's valid `traceparent` is kept as is.
fn save_context(headers: &HeaderMap, user_id: String) -> SaveContext {
    let incoming = || {
        let value = headers.get("traceparent")?.to_str().ok()?;
        telemetry::normalize(value)
    };
    SaveContext {
        user_id,
        traceparent: telemetry::traceparent(&tracing::Span::current()).or_else(incoming),
    }
}

/// Saves a whole order and queues its delivery to 1C, in one transaction.
///
/// Creates the order if it does not exist, otherwise replaces it. Every save
/// increments `version` and records status and price changes in the history.
#[utoipa::path(put, path = "/api/v1/orders/{id}", tag = "orders",
    params(
        ("id" = String, Path, description = "Order id: 1-64 of A-Z a-z 0-9 - _ ."),
        ("If-Match" = Option<String>, Header, description = "Save only if the order is at this version, e.g. \"3\"; * for any existing version"),
        ("If-None-Match" = Option<String>, Header, description = "* saves only if the order does not exist yet"),
        ("X-User-Id" = Option<String>, Header, description = "Who saves; recorded in the history"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context, carried on to 1C"),
    ),
    request_body = OrderFull,
    responses(
        (status = 200, description = "Replaced", body = OrderView, headers(("ETag" = String))),
        (status = 201, description = "Created", body = OrderView, headers(("ETag" = String), ("Location" = String))),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A checkout on an order that exists", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Version precondition failed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid order", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn save_order(
    State(state): State<AppState>,
    PathId(id): PathId<OrderId>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<OrderFull>,
) -> Result<Response, ApiError> {
    let pre = extract::precondition(&headers)?;
    let ctx = save_context(&headers, extract::user_id(&headers)?);
    let order = input.validate(Some(&id))?;
    let snapshot = state.cache.as_ref().map(|c| c.snapshot());
    let Saved {
        view,
        created,
        queued,
    } = state.store.save_order(&order, pre, &ctx).await?;
    state.metrics.saved(created, &queued);
    remember(&state, snapshot, &view);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(view_response(status, &view))
}

/// Creates an order. An `Idempotency-Key` makes retries safe: the same key
/// with the same body returns the first response, with another body a 422.
#[utoipa::path(post, path = "/api/v1/orders", tag = "orders",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1-255 visible ASCII characters"),
        ("X-User-Id" = Option<String>, Header, description = "Who creates; recorded in the history"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context, carried on to 1C"),
    ),
    request_body(content = OrderFull, description = "The order; `order.id` may be omitted to have one generated"),
    responses(
        (status = 201, description = "Created (or the replay of the first create with this key)", body = OrderView,
            headers(("ETag" = String), ("Location" = String), ("Idempotent-Replayed" = String))),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An order with this id exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid order, or key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<OrderFull>,
) -> Result<Response, ApiError> {
    let key = extract::idempotency_key(&headers)?;
    let ctx = save_context(&headers, extract::user_id(&headers)?);
    // Hash what the client sent, before an id is generated for it.
    let hash = RequestHash::of(&(&input, &input.checkout));
    let order = input.validate(None)?;
    let snapshot = state.cache.as_ref().map(|c| c.snapshot());
    let outcome = state
        .store
        .create_order(&order, key.as_ref().map(|k| (k, hash)), &ctx)
        .await
        .map_err(|e| match e {
            // A create is not conditional from the client's view: a taken id conflicts.
            e @ store::Error::PreconditionFailed { .. } => ApiError::Conflict(e.to_string()),
            e => e.into(),
        })?;
    match outcome {
        CreateOutcome::Created(saved) => {
            state.metrics.saved(true, &saved.queued);
            remember(&state, snapshot, &saved.view);
            Ok(view_response(StatusCode::CREATED, &saved.view))
        }
        CreateOutcome::Replayed { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
            let mut res = (status, Json(&body)).into_response();
            let h = res.headers_mut();
            h.insert(REPLAYED, HeaderValue::from_static("true"));
            if let Some(v) = body.get("version").and_then(|v| v.as_i64()) {
                h.insert(header::ETAG, etag(v));
            }
            if let Some(id) = body.pointer("/order/id").and_then(|v| v.as_str()) {
                h.insert(header::LOCATION, location(id));
            }
            Ok(res)
        }
    }
}

/// What a read asks of the version it gets.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// Never answer an older version than this one (e.g. the version a
    /// save returned); a replica whose cache is behind reads the database.
    min_version: Option<i64>,
}

/// `RFC 9211` `Cache-Status` of an order read.
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

fn read_response(version: i64, body: axum::body::Bytes, seen: &Seen, hit: bool) -> Response {
    let mut res = if seen.matches(version) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    };
    let h = res.headers_mut();
    h.insert(header::ETAG, etag(version));
    h.insert(
        CACHE_STATUS,
        HeaderValue::from_static(if hit {
            "orders-center; hit"
        } else {
            "orders-center; fwd=miss"
        }),
    );
    res
}

use extract::Seen;

/// The order with its items, payments, history, version and 1C sync state.
///
/// Served from the replica's cache when it holds the order at the version
/// asked for. `If-None-Match` with an ETag this API gave (or `min_version`)
/// names the version the client saw: the answer is never older, and is a
/// 304 when the order is still at it.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders",
    params(
        ("id" = String, Path, description = "Order id"),
        ("If-None-Match" = Option<String>, Header, description = "ETags seen, e.g. \"3\": 304 if the order is at one of them, never an older version"),
        ReadParams,
    ),
    responses(
        (status = 200, description = "The order", body = OrderView,
            headers(("ETag" = String), ("Cache-Status" = String, description = "`orders-center; hit` when served from the cache"))),
        (status = 304, description = "Still at the version named in If-None-Match", headers(("ETag" = String))),
        (status = 400, description = "Malformed id, min_version or If-None-Match", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_order(
    State(state): State<AppState>,
    PathId(id): PathId<OrderId>,
    headers: HeaderMap,
    QueryParams(p): QueryParams<ReadParams>,
) -> Result<Response, ApiError> {
    let seen = extract::seen_versions(&headers)?;
    if p.min_version.is_some_and(|v| v < 1) {
        return Err(ApiError::BadRequest("min_version must be 1 or more".into()));
    }
    let min = p.min_version.unwrap_or(0).max(seen.newest());
    let Some(cache) = &state.cache else {
        let view = state.store.get_order(&id).await?;
        return Ok(view_read(&view, &seen));
    };
    let snapshot = cache.snapshot();
    if let Some(entry) = cache.get(id.as_str(), min) {
        let entry = if entry.sync_in_flight() {
            let sync = state.store.order_sync(&id).await?;
            if sync.as_ref() == entry.sync() {
                entry
            } else {
                cache.refresh_sync(snapshot, id.as_str(), &entry, sync)
            }
        } else {
            entry
        };
        return Ok(read_response(entry.version(), entry.body(), &seen, true));
    }
    let view = state.store.get_order(&id).await?;
    cache.fill(snapshot, &view);
    Ok(view_read(&view, &seen))
}

/// The answer to a read served from the database.
fn view_read(view: &OrderView, seen: &Seen) -> Response {
    let body = serde_json::to_vec(view).expect("orders serialize");
    read_response(view.version, body.into(), seen, false)
}

/// The order's status and price changes, oldest first.
#[utoipa::path(get, path = "/api/v1/orders/{id}/history", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "History", body = Vec<HistoryEntry>),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn order_history(
    State(state): State<AppState>,
    PathId(id): PathId<OrderId>,
) -> Result<Json<Vec<HistoryEntry>>, ApiError> {
    Ok(Json(state.store.order_history(&id).await?))
}

/// The order's state chain (seed 001): every step of its saga with its
/// time and idempotency key, oldest first. Empty for an order without a
/// checkout.
#[utoipa::path(get, path = "/api/v1/orders/{id}/states", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The chain", body = Vec<ChainStep>),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn order_states(
    State(state): State<AppState>,
    PathId(id): PathId<OrderId>,
) -> Result<Json<Vec<ChainStep>>, ApiError> {
    Ok(Json(state.store.order_states(&id).await?))
}

/// Changes the order's status; recorded in the history and delivered to 1C
/// like any save.
#[utoipa::path(post, path = "/api/v1/orders/{id}/status", tag = "orders",
    params(
        ("id" = String, Path, description = "Order id"),
        ("If-Match" = Option<String>, Header, description = "Change only if the order is at this version"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context, carried on to 1C"),
    ),
    request_body = StatusChange,
    responses(
        (status = 200, description = "Changed", body = OrderView, headers(("ETag" = String))),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Version precondition failed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid status", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn change_status(
    State(state): State<AppState>,
    PathId(id): PathId<OrderId>,
    headers: HeaderMap,
    JsonBody(change): JsonBody<StatusChange>,
) -> Result<Response, ApiError> {
    let pre = extract::precondition(&headers)?;
    change.validate()?;
    let ctx = save_context(&headers, change.user_id.clone());
    let snapshot = state.cache.as_ref().map(|c| c.snapshot());
    let saved = state.store.change_status(&id, &change, pre, &ctx).await?;
    state.metrics.saved(false, &saved.queued);
    remember(&state, snapshot, &saved.view);
    Ok(view_response(StatusCode::OK, &saved.view))
}

/// Filters and paging of the order list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only orders with this status.
    status: Option<String>,
    /// Only orders in this city.
    city: Option<String>,
    /// Only orders updated at or after this instant (RFC 3339).
    updated_since: Option<DateTime<Utc>>,
    /// Page size, 1 to 500; 50 by default.
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// One page of orders.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderPage {
    /// Orders in creation order.
    pub orders: Vec<OrderSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Orders matching the filters, in creation order, with keyset pagination: a
/// walk through the pages returns every order exactly once, even while
/// orders are being written.
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders",
    params(ListParams),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "Bad filter, limit or cursor", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_orders(
    State(state): State<AppState>,
    QueryParams(p): QueryParams<ListParams>,
) -> Result<Json<OrderPage>, ApiError> {
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 500".into()));
    }
    let after = p.cursor.as_deref().map(Cursor::decode).transpose()?;
    let filter = ListFilter {
        status: p.status,
        city: p.city,
        updated_since: p.updated_since,
    };
    let page = state.store.list_orders(&filter, after, limit).await?;
    Ok(Json(OrderPage {
        orders: page.orders,
        next_cursor: page.next.map(Cursor::encode),
    }))
}

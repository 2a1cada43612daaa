//! The order endpoints: save, create, read, list, history and status change.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use domain::{HistoryEntry, OrderFull, OrderSummary, OrderView, StatusChange};
use serde::{Deserialize, Serialize};
use store::saga::ChainStep;
use store::{CreateOutcome, Cursor, ListFilter, RequestHash, SaveContext, Saved};
use utoipa::{IntoParams, ToSchema};

use crate::extract::{self, JsonBody, OrderPath, QueryParams};
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
    OrderPath(id): OrderPath,
    headers: HeaderMap,
    JsonBody(input): JsonBody<OrderFull>,
) -> Result<Response, ApiError> {
    let pre = extract::precondition(&headers)?;
    let ctx = save_context(&headers, extract::user_id(&headers)?);
    let order = input.validate(Some(&id))?;
    let Saved {
        view,
        created,
        queued,
    } = state.store.save_order(&order, pre, &ctx).await?;
    state.metrics.saved(created, &queued);
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

/// The order with its items, payments, history, version and 1C sync state.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order", body = OrderView, headers(("ETag" = String))),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_order(
    State(state): State<AppState>,
    OrderPath(id): OrderPath,
) -> Result<Response, ApiError> {
    let view = state.store.get_order(&id).await?;
    Ok(view_response(StatusCode::OK, &view))
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
    OrderPath(id): OrderPath,
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
    OrderPath(id): OrderPath,
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
    OrderPath(id): OrderPath,
    headers: HeaderMap,
    JsonBody(change): JsonBody<StatusChange>,
) -> Result<Response, ApiError> {
    let pre = extract::precondition(&headers)?;
    change.validate()?;
    let ctx = save_context(&headers, change.user_id.clone());
    let saved = state.store.change_status(&id, &change, pre, &ctx).await?;
    state.metrics.saved(false, &saved.queued);
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

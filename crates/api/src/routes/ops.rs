//! Health, readiness, metrics and backlog figures.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use domain::{Destination, SyncStats};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::extract::QueryParams;
use crate::{ApiError, AppState};

/// A liveness or readiness answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The process can serve: the database answers within two seconds, and the
/// order cache (if any) is warm or its warm-up limit has passed.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Ready", body = Health),
    (status = 503, description = "Database unavailable, or the order cache still warming up",
        body = crate::Problem, content_type = "application/problem+json")))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) if state.cache.as_ref().is_some_and(|c| !c.is_ready()) => Err(ApiError::Warming),
        Ok(Ok(())) => Ok(Json(Health { status: "ready" })),
        // Any failure of a trivial query means this process cannot serve.
        Ok(Err(e)) => Err(ApiError::Unavailable(e)),
        Err(_) => Err(ApiError::Unavailable(store::Error::Unavailable(
            sqlx::Error::PoolTimedOut,
        ))),
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Which destination's backlog.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// The destination, e.g. `onec` (the default).
    #[param(value_type = Option<String>)]
    destination: Option<Destination>,
}

/// Backlog figures of one destination's outbox tasks: pending, running and
/// dead, and the age of the oldest pending one.
#[utoipa::path(get, path = "/api/v1/sync/stats", tag = "sync", params(StatsParams), responses(
    (status = 200, description = "Backlog figures", body = SyncStats),
    (status = 400, description = "Not a destination name", body = crate::Problem,
        content_type = "application/problem+json"),
    (status = 503, description = "Database unavailable", body = crate::Problem,
        content_type = "application/problem+json")))]
pub async fn sync_stats(
    State(state): State<AppState>,
    QueryParams(p): QueryParams<StatsParams>,
) -> Result<Json<SyncStats>, ApiError> {
    let destination = p.destination.unwrap_or_else(Destination::onec);
    Ok(Json(state.store.sync_stats(&destination).await?))
}

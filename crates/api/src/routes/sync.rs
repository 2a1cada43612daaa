//! Outbox tasks: listing them by state and replaying dead ones.

use axum::extract::{FromRequestParts, Path, State};
use axum::Json;
use domain::{Destination, TaskState, TaskSummary};
use serde::Deserialize;
use store::TaskId;
use utoipa::IntoParams;

use crate::extract::QueryParams;
use crate::{ApiError, AppState, Problem};

/// Which tasks to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskListParams {
    /// Only this destination's tasks, e.g. `onec`; every destination's by
    /// default.
    #[param(value_type = Option<String>)]
    destination: Option<Destination>,
    /// Task state; `dead` by default.
    state: Option<TaskState>,
    /// Page size, 1 to 500; 100 by default.
    limit: Option<u32>,
    /// Only tasks with a larger id: the last id of the previous page.
    after: Option<i64>,
}

/// Tasks in one state, of one destination or all, oldest first. Page with
/// `after`.
#[utoipa::path(get, path = "/api/v1/sync/tasks", tag = "sync",
    params(TaskListParams),
    responses(
        (status = 200, description = "Tasks", body = Vec<TaskSummary>),
        (status = 400, description = "Bad state, limit or cursor", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_tasks(
    State(state): State<AppState>,
    QueryParams(p): QueryParams<TaskListParams>,
) -> Result<Json<Vec<TaskSummary>>, ApiError> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 500".into()));
    }
    let tasks = state
        .store
        .list_tasks(
            p.destination.as_ref(),
            p.state.unwrap_or(TaskState::Dead),
            p.after.map(TaskId),
            limit,
        )
        .await?;
    Ok(Json(tasks))
}

/// The `{id}` of a task route.
pub struct TaskPath(TaskId);

impl<S: Send + Sync> FromRequestParts<S> for TaskPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let Path(id) = Path::<i64>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("task id: {}", e.body_text())))?;
        Ok(Self(TaskId(id)))
    }
}

/// Replays a dead task: pending again at once, with a fresh attempt budget.
/// Refused (409) when the task is not dead, or when a newer message of the
/// same order was queued for its destination since: 1C must never go back
/// a version, and an ordered stream never gets a message after a newer one.
#[utoipa::path(post, path = "/api/v1/sync/tasks/{id}/retry", tag = "sync",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 200, description = "Queued again", body = TaskSummary),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not replayable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn retry_task(
    State(state): State<AppState>,
    TaskPath(id): TaskPath,
) -> Result<Json<TaskSummary>, ApiError> {
    Ok(Json(state.store.retry_task(id).await?))
}

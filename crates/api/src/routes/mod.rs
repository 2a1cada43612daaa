//! Route table of the API.

pub(crate) mod ops;
pub(crate) mod orders;
pub(crate) mod sync;

use axum::routing::{get, post};
use axum::Router;

use crate::AppState;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/orders",
            post(orders::create_order).get(orders::list_orders),
        )
        .route(
            "/api/v1/orders/{id}",
            get(orders::get_order).put(orders::save_order),
        )
        .route("/api/v1/orders/{id}/history", get(orders::order_history))
        .route("/api/v1/orders/{id}/status", post(orders::change_status))
        .route("/api/v1/orders/{id}/states", get(orders::order_states))
        .route("/api/v1/sync/stats", get(ops::sync_stats))
        .route("/api/v1/sync/tasks", get(sync::list_tasks))
        .route("/api/v1/sync/tasks/{id}/retry", post(sync::retry_task))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
}

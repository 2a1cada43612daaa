//! The OpenAPI document, generated from the handlers and types, and Swagger UI.

use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::routes::{ops, orders, sync};
use crate::AppState;

/// The OpenAPI 3.1 description of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "orders-center",
        description = "The single source of truth for orders. Every save is delivered to 1C \
                       through a transactional outbox. Errors are RFC 9457 problem+json."
    ),
    paths(
        orders::save_order,
        orders::create_order,
        orders::get_order,
        orders::list_orders,
        orders::order_history,
        orders::change_status,
        ops::sync_stats,
        sync::list_tasks,
        sync::retry_task,
        ops::healthz,
        ops::readyz,
        ops::metrics,
    ),
    tags(
        (name = "orders", description = "Saving and reading orders"),
        (name = "sync", description = "Delivery to 1C"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

/// `/openapi.json` and Swagger UI at `/docs`.
pub(crate) fn docs_router() -> Router<AppState> {
    SwaggerUi::new("/docs")
        .url("/openapi.json", ApiDoc::openapi())
        .into()
}

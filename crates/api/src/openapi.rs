//! The OpenAPI document, generated from the handlers and types, and Swagger UI.

use axum::Router;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};
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
        orders::order_states,
        orders::change_status,
        ops::sync_stats,
        sync::list_tasks,
        sync::retry_task,
        ops::healthz,
        ops::readyz,
        ops::metrics,
    ),
    modifiers(&RouterWideAnswers),
    tags(
        (name = "orders", description = "Saving and reading orders"),
        (name = "sync", description = "Delivery to 1C"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

/// Documents what the layers in front of every handler can answer, so the
/// document lists every status a client can see: the bearer check, the
/// body limit, the request timeout, a malformed request, an unreachable
/// database and a caught panic.
/// Every role's API puts the same layers in front of its handlers, so each
/// document adds them.
pub struct RouterWideAnswers;

impl Modify for RouterWideAnswers {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        for (path, item) in api.paths.paths.iter_mut() {
            if !path.starts_with("/api/") {
                continue;
            }
            for (read, op) in operations(item) {
                let admin = path.starts_with("/api/v1/sync/tasks");
                let with_body = op.request_body.is_some();
                let answers = [
                    (400, "Malformed request", true),
                    (
                        401,
                        "A bearer token is required (when tokens are configured)",
                        true,
                    ),
                    (403, "The bearer token is not valid", true),
                    (408, "The request took too long", true),
                    (413, "Body too large", with_body),
                    (415, "Not JSON", with_body),
                    (422, "Invalid body", with_body),
                    (500, "Internal error", true),
                    (503, "Database unavailable; retry after `Retry-After`", true),
                ];
                for (status, description, applies) in answers {
                    if applies {
                        op.responses
                            .responses
                            .entry(status.to_string())
                            .or_insert_with(|| problem(description).into());
                    }
                }
                // Reads are open unless configured otherwise; writes and the
                // sync admin endpoints need a token whenever tokens are set.
                let mut security = vec![SecurityRequirement::new("bearer", Vec::<String>::new())];
                if read && !admin {
                    security.push(SecurityRequirement::default());
                }
                op.security = Some(security);
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = (bool, &mut Operation)> {
    [
        (true, item.get.as_mut()),
        (false, item.put.as_mut()),
        (false, item.post.as_mut()),
        (false, item.delete.as_mut()),
        (false, item.patch.as_mut()),
    ]
    .into_iter()
    .filter_map(|(read, op)| Some((read, op?)))
}

fn problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            crate::PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// `/openapi.json` and Swagger UI at `/docs`.
pub(crate) fn docs_router() -> Router<AppState> {
    SwaggerUi::new("/docs")
        .url("/openapi.json", ApiDoc::openapi())
        .into()
}

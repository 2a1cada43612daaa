//! inventory's HTTP API: stock levels and reservations, with OpenAPI at
//! `/openapi.json`, Swagger UI at `/docs` and problem+json errors.

use api::extract::{JsonBody, Name, PathId};
use api::{ApiError, Problem, RouterWideAnswers};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use sqlx::PgPool;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::stock::{self, Reservation, StockLevel};

/// The body of a stock update.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    /// Units free to reserve, 0 to 1,000,000,000,000 less what the
    /// product's reservations hold.
    #[schema(example = 100, minimum = 0, maximum = 1_000_000_000_000_i64)]
    pub available: i64,
}

/// inventory's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "inventory",
        description = "Stock per product and reservations per order."
    ),
    paths(list_stock, get_stock, set_stock, get_reservation),
    components(schemas(Problem)),
    modifiers(&RouterWideAnswers)
)]
pub struct InventoryApi;

/// The routes over inventory's database.
pub fn router(pool: PgPool) -> Router {
    let routes = Router::new()
        .route("/api/v1/stock", get(list_stock))
        .route("/api/v1/stock/{product_id}", get(get_stock).put(set_stock))
        .route("/api/v1/reservations/{order_id}", get(get_reservation))
        .with_state(pool);
    api::with_problems(routes)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", InventoryApi::openapi()))
}

/// Every product's stock.
#[utoipa::path(get, path = "/api/v1/stock", tag = "stock",
    responses((status = 200, description = "Stock by product id", body = Vec<StockLevel>)))]
async fn list_stock(State(pool): State<PgPool>) -> Result<Json<Vec<StockLevel>>, ApiError> {
    Ok(Json(stock::levels(&pool).await?))
}

/// One product's stock.
#[utoipa::path(get, path = "/api/v1/stock/{product_id}", tag = "stock",
    params(("product_id" = String, Path, description = "1-64 of A-Z a-z 0-9 - _ .")),
    responses(
        (status = 200, description = "The stock", body = StockLevel),
        (status = 400, description = "Invalid product id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown product", body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_stock(
    State(pool): State<PgPool>,
    PathId(Name(product)): PathId<Name>,
) -> Result<Json<StockLevel>, ApiError> {
    stock::level(&pool, &product)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("product {product:?} is unknown")))
}

/// Sets a product's available stock, creating the product.
#[utoipa::path(put, path = "/api/v1/stock/{product_id}", tag = "stock",
    params(("product_id" = String, Path, description = "1-64 of A-Z a-z 0-9 - _ .")),
    request_body = SetStock,
    responses(
        (status = 200, description = "The stock now", body = StockLevel),
        (status = 400, description = "Malformed body or product id", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A level below 0 or over the maximum", body = Problem, content_type = "application/problem+json"),
    ))]
async fn set_stock(
    State(pool): State<PgPool>,
    PathId(Name(product)): PathId<Name>,
    JsonBody(body): JsonBody<SetStock>,
) -> Result<Json<StockLevel>, ApiError> {
    if body.available < 0 {
        return Err(ApiError::invalid("available", "must not be negative"));
    }
    match stock::set_available(&pool, &product, body.available).await? {
        Ok(level) => Ok(Json(level)),
        Err(held) => Err(ApiError::invalid(
            "available",
            format!(
                "with the {held} units its reservations hold, would take the product over \
                 the maximum of {} units; at most {} may be available",
                stock::MAX_STOCK,
                stock::MAX_STOCK - held
            ),
        )),
    }
}

/// One order's reservation.
#[utoipa::path(get, path = "/api/v1/reservations/{order_id}", tag = "stock",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 400, description = "Invalid order id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No reservation for this order", body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_reservation(
    State(pool): State<PgPool>,
    PathId(order): PathId<domain::OrderId>,
) -> Result<Json<Reservation>, ApiError> {
    stock::reservation(&pool, order.as_str())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("order {:?} has no reservation", order.as_str())))
}

//! payments' HTTP API: accounts, top-ups, balances and payments, with
//! OpenAPI at `/openapi.json`, Swagger UI at `/docs` and problem+json
//! errors. Amounts are exact decimals with at most two places.

use api::extract::{JsonBody, Name, PathId};
use api::{ApiError, Problem, RouterWideAnswers};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::Money;
use serde::Deserialize;
use sqlx::PgPool;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::ledger::{self, Account, PaymentRecord};

/// The body of an account opening.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccount {
    /// 1-64 of A-Z a-z 0-9 - _ .
    #[schema(example = "acc-1")]
    pub account_id: String,
}

/// The body of a top-up.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUp {
    /// Above zero, at most two decimal places.
    #[schema(example = 150.5)]
    pub amount: Money,
}

/// payments' OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "payments",
        description = "Accounts with balances, and one payment per order."
    ),
    paths(open_account, get_account, top_up, list_payments),
    components(schemas(Problem)),
    modifiers(&RouterWideAnswers)
)]
pub struct PaymentsApi;

/// The routes over payments' database.
pub fn router(pool: PgPool) -> Router {
    let routes = Router::new()
        .route("/api/v1/accounts", post(open_account))
        .route("/api/v1/accounts/{id}", get(get_account))
        .route("/api/v1/accounts/{id}/top-ups", post(top_up))
        .route("/api/v1/accounts/{id}/payments", get(list_payments))
        .with_state(pool);
    api::with_problems(routes)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", PaymentsApi::openapi()))
}

fn no_account(id: &str) -> ApiError {
    ApiError::NotFound(format!("account {id:?} does not exist"))
}

/// Opens an account with a zero balance.
#[utoipa::path(post, path = "/api/v1/accounts", tag = "accounts",
    request_body = OpenAccount,
    responses(
        (status = 201, description = "Opened", body = Account, headers(("Location" = String))),
        (status = 409, description = "The account exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid account id", body = Problem, content_type = "application/problem+json"),
    ))]
async fn open_account(
    State(pool): State<PgPool>,
    JsonBody(body): JsonBody<OpenAccount>,
) -> Result<Response, ApiError> {
    saga::messages::check_name(&body.account_id).map_err(|m| ApiError::invalid("account_id", m))?;
    let account = ledger::open(&pool, &body.account_id)
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("account {:?} exists", body.account_id)))?;
    let location = format!("/api/v1/accounts/{}", account.account_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(account),
    )
        .into_response())
}

/// The account and its balance.
#[utoipa::path(get, path = "/api/v1/accounts/{id}", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, description = "The account", body = Account),
        (status = 400, description = "Invalid account id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_account(
    State(pool): State<PgPool>,
    PathId(Name(id)): PathId<Name>,
) -> Result<Json<Account>, ApiError> {
    ledger::get(&pool, &id)
        .await?
        .map(Json)
        .ok_or_else(|| no_account(&id))
}

/// Adds money to the account.
#[utoipa::path(post, path = "/api/v1/accounts/{id}/top-ups", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    request_body = TopUp,
    responses(
        (status = 200, description = "The account after the top-up", body = Account),
        (status = 400, description = "Malformed body or account id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a positive amount in cents, or one that would take the account's funds over the maximum", body = Problem, content_type = "application/problem+json"),
    ))]
async fn top_up(
    State(pool): State<PgPool>,
    PathId(Name(id)): PathId<Name>,
    JsonBody(body): JsonBody<TopUp>,
) -> Result<Json<Account>, ApiError> {
    body.amount
        .check()
        .map_err(|m| ApiError::invalid("amount", m))?;
    if body.amount == Money::ZERO {
        return Err(ApiError::invalid("amount", "must be above zero"));
    }
    match ledger::top_up(&pool, &id, body.amount).await? {
        ledger::TopUp::Done(account) => Ok(Json(account)),
        ledger::TopUp::NoAccount => Err(no_account(&id)),
        ledger::TopUp::OverMaximum { room } => Err(ApiError::invalid(
            "amount",
            format!(
                "would take the account's funds (its balance and what is charged and not refunded) \
                 over the maximum of {}; at most {} more can be added",
                ledger::MAX_FUNDS, room
            ),
        )),
    }
}

/// The account's payments, newest first (at most 1,000).
#[utoipa::path(get, path = "/api/v1/accounts/{id}/payments", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, description = "Payments", body = Vec<PaymentRecord>),
        (status = 400, description = "Invalid account id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_payments(
    State(pool): State<PgPool>,
    PathId(Name(id)): PathId<Name>,
) -> Result<Json<Vec<PaymentRecord>>, ApiError> {
    if ledger::get(&pool, &id).await?.is_none() {
        return Err(no_account(&id));
    }
    Ok(Json(ledger::payments_of(&pool, &id, 1000).await?))
}

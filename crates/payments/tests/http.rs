//! payments' HTTP API over real PostgreSQL: accounts, exact top-ups, and
//! problem+json answers that write nothing.

use axum::http::{Method, StatusCode};
use serde_json::json;
use testkit::http::call;

async fn app() -> (axum::Router, sqlx::PgPool) {
    let db = testkit::unmigrated_database().await;
    payments::migrate(&db.pool).await.unwrap();
    (payments::http::router(db.pool.clone()), db.pool)
}

async fn top_ups(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM top_ups")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_account_opens_at_zero_and_adds_up_to_the_cent() {
    let (app, _) = app().await;
    let (status, _, body) = call(
        &app,
        Method::POST,
        "/api/v1/accounts",
        Some(json!({"account_id": "acc-1"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["balance"], json!(0));
    for amount in [json!(0.1), json!(0.2), json!(9999999999.99)] {
        let (status, _, _) = call(
            &app,
            Method::POST,
            "/api/v1/accounts/acc-1/top-ups",
            Some(json!({"amount": amount})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, _, body) = call(&app, Method::GET, "/api/v1/accounts/acc-1", None).await;
    assert_eq!(body["balance"].to_string(), "10000000000.29");
    let (status, _, body) = call(&app, Method::GET, "/api/v1/accounts/acc-1/payments", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn bad_input_gets_a_problem_and_writes_nothing() {
    let (app, pool) = app().await;
    call(
        &app,
        Method::POST,
        "/api/v1/accounts",
        Some(json!({"account_id": "acc-1"})),
    )
    .await;
    let cases = [
        (
            Method::POST,
            "/api/v1/accounts/acc-1/top-ups",
            Some(json!({"amount": 0.001})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at most two decimal places",
        ),
        (
            Method::POST,
            "/api/v1/accounts/acc-1/top-ups",
            Some(json!({"amount": 0})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "above zero",
        ),
        (
            Method::POST,
            "/api/v1/accounts/acc-1/top-ups",
            Some(json!({"amount": -5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "negative",
        ),
        (
            Method::POST,
            "/api/v1/accounts/acc-1/top-ups",
            Some(json!({"amount": "5"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "",
        ),
        (
            Method::POST,
            "/api/v1/accounts/nobody/top-ups",
            Some(json!({"amount": 5})),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            Method::GET,
            "/api/v1/accounts/nobody",
            None,
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            Method::GET,
            "/api/v1/accounts/nobody/payments",
            None,
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            Method::POST,
            "/api/v1/accounts",
            Some(json!({"account_id": "acc-1"})),
            StatusCode::CONFLICT,
            "exists",
        ),
        (
            Method::POST,
            "/api/v1/accounts",
            Some(json!({"account_id": "has space"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "",
        ),
        (
            Method::GET,
            "/api/v1/nowhere",
            None,
            StatusCode::NOT_FOUND,
            "",
        ),
        (
            Method::GET,
            "/api/v1/accounts/a%00b",
            None,
            StatusCode::BAD_REQUEST,
            "id in the path",
        ),
        (
            Method::GET,
            "/api/v1/accounts/a%00b/payments",
            None,
            StatusCode::BAD_REQUEST,
            "id in the path",
        ),
        (
            Method::POST,
            "/api/v1/accounts/a%00b/top-ups",
            Some(json!({"amount": 5})),
            StatusCode::BAD_REQUEST,
            "id in the path",
        ),
    ];
    for (method, uri, body, want, says) in cases {
        let (status, content_type, problem) = call(&app, method.clone(), uri, body.clone()).await;
        assert_eq!(status, want, "{method} {uri} {body:?}: {problem}");
        assert_eq!(content_type, api::PROBLEM_JSON, "{method} {uri}");
        assert!(problem.to_string().contains(says), "{problem}");
    }
    assert_eq!(top_ups(&pool).await, 0);
    let (_, _, body) = call(&app, Method::GET, "/api/v1/accounts/acc-1", None).await;
    assert_eq!(body["balance"], json!(0));
}

#[tokio::test]
async fn a_top_up_past_the_maximum_is_refused_with_the_maximum_named() {
    let (app, pool) = app().await;
    call(
        &app,
        Method::POST,
        "/api/v1/accounts",
        Some(json!({"account_id": "acc-1"})),
    )
    .await;
    // Exact numbers: the body is parsed, never built from an f64.
    let amount = |a: &str| serde_json::from_str(&format!(r#"{{"amount": {a}}}"#)).unwrap();
    let uri = "/api/v1/accounts/acc-1/top-ups";
    let (status, _, body) = call(&app, Method::POST, uri, Some(amount("9999999999999.99"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, content_type, problem) = call(&app, Method::POST, uri, Some(amount("0.01"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(content_type, api::PROBLEM_JSON);
    assert!(
        problem.to_string().contains("9999999999999.99"),
        "{problem}"
    );
    assert_eq!(top_ups(&pool).await, 1, "the refused top-up wrote nothing");
}

#[tokio::test]
async fn behind_the_bearer_scheme_writes_need_a_token_and_a_refused_one_writes_nothing() {
    use tower::ServiceExt;
    let (routes, pool) = app().await;
    let app = api::protect(routes, api::AuthConfig::new(["s3cret"], false));
    let request = |token: Option<&str>, uri: &str, body: serde_json::Value| {
        let mut r = axum::http::Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(axum::body::Body::from(body.to_string())).unwrap()
    };
    let open = json!({"account_id": "acc-1"});
    for (token, want) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some("guess"), StatusCode::FORBIDDEN),
        (Some("s3cret"), StatusCode::CREATED),
    ] {
        let response = app
            .clone()
            .oneshot(request(token, "/api/v1/accounts", open.clone()))
            .await
            .unwrap();
        assert_eq!(response.status(), want, "{token:?}");
    }
    let response = app
        .clone()
        .oneshot(request(
            None,
            "/api/v1/accounts/acc-1/top-ups",
            json!({"amount": 5}),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(top_ups(&pool).await, 0, "the refused top-up wrote nothing");
    let (status, _, _) = call(&app, Method::GET, "/api/v1/accounts/acc-1", None).await;
    assert_eq!(status, StatusCode::OK, "reads stay open unless protected");
}

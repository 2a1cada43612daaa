//! Bearer tokens: 401 without, 403 with a wrong one, nothing written either way.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::json;

use crate::support::{json_request, TestApp};

const TOKEN: &str = "s3cret-token-1";

async fn app(protect_reads: bool) -> TestApp {
    TestApp::with_config(api::ApiConfig {
        auth: api::AuthConfig::new([TOKEN, "rotated-token-2"], protect_reads),
        ..Default::default()
    })
    .await
}

fn put(id: &str, authorization: Option<&str>) -> Request<Body> {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    json_request(
        Method::PUT,
        &format!("/api/v1/orders/{id}"),
        &testkit::sample_order(id),
        &headers,
    )
}

fn get(uri: &str, authorization: Option<&str>) -> Request<Body> {
    let mut b = Request::get(uri);
    if let Some(a) = authorization {
        b = b.header("authorization", a);
    }
    b.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn writes_need_a_valid_token_and_nothing_is_written_without_one() {
    let app = app(false).await;
    let before = app.counts().await;

    let missing = app.send(put("A-1", None)).await;
    let p = missing.problem(StatusCode::UNAUTHORIZED);
    assert_eq!(p["type"], "urn:orders-center:problem:unauthorized");
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"orders-center\"")
    );
    for wrong in [
        "Bearer nope",
        "Bearer s3cret-token-",
        "Bearer s3cret-token-1x",
        "Bearer ",
    ] {
        let reply = app.send(put("A-1", Some(wrong))).await;
        assert!(
            matches!(
                reply.status,
                StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED
            ),
            "{wrong:?} got {}",
            reply.status
        );
        reply.problem(reply.status);
    }
    app.send(put("A-1", Some("Bearer nope")))
        .await
        .problem(StatusCode::FORBIDDEN);
    app.send(put("A-1", Some("Basic czNjcmV0")))
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.counts().await,
        before,
        "a refused write changed a table"
    );

    assert_eq!(
        app.send(put("A-1", Some(&format!("Bearer {TOKEN}"))))
            .await
            .status,
        201
    );
    assert_eq!(
        app.send(put("A-2", Some("bearer rotated-token-2")))
            .await
            .status,
        201
    );
    assert_eq!(app.counts().await.orders, before.orders + 2);
}

#[tokio::test]
async fn the_sync_admin_endpoints_need_a_token_even_for_reads() {
    let app = app(false).await;
    app.send(get("/api/v1/sync/tasks", None))
        .await
        .problem(StatusCode::UNAUTHORIZED);
    let retry = json_request(Method::POST, "/api/v1/sync/tasks/1/retry", &json!({}), &[]);
    app.send(retry).await.problem(StatusCode::UNAUTHORIZED);
    let ok = app
        .send(get("/api/v1/sync/tasks", Some(&format!("Bearer {TOKEN}"))))
        .await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn reads_are_public_or_protected_as_configured_and_probes_stay_open() {
    let public = app(false).await;
    assert_eq!(public.send(get("/api/v1/orders", None)).await.status, 200);
    let protected = app(true).await;
    protected
        .send(get("/api/v1/orders", None))
        .await
        .problem(StatusCode::UNAUTHORIZED);
    protected
        .send(get("/api/v1/orders/A-1", Some("Bearer wrong")))
        .await
        .problem(StatusCode::FORBIDDEN);
    let with = protected
        .send(get("/api/v1/orders", Some(&format!("Bearer {TOKEN}"))))
        .await;
    assert_eq!(with.status, 200);
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(protected.send(get(open, None)).await.status, 200, "{open}");
    }
}

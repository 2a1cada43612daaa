use axum::http::{Method, StatusCode};
use serde_json::json;
use testkit::sample_order;

use crate::support::{json_request, send, TestApp};

fn without_id(mut body: serde_json::Value) -> serde_json::Value {
    body["order"].as_object_mut().unwrap().remove("id");
    body
}

#[tokio::test]
async fn a_retry_with_the_same_key_and_body_returns_the_first_result() {
    let app = TestApp::new().await;
    let body = without_id(sample_order("x"));
    let post = || {
        json_request(
            Method::POST,
            "/api/v1/orders",
            &body,
            &[("idempotency-key", "create-1")],
        )
    };

    let first = app.send(post()).await;
    let retry = app.send(post()).await;

    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("idempotent-replayed"), None);
    let id = first.json()["order"]["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a generated UUID");
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.json(), first.json());
    assert_eq!(
        retry.header("location"),
        Some(format!("/api/v1/orders/{id}").as_str())
    );
    assert_eq!(retry.header("etag"), Some("\"1\""));
    let c = app.counts().await;
    assert_eq!((c.orders, c.tasks, c.idempotency_keys), (1, 1, 1));
}

#[tokio::test]
async fn the_same_key_with_another_body_is_422_and_writes_nothing() {
    let app = TestApp::new().await;
    let body = without_id(sample_order("x"));
    app.send(json_request(
        Method::POST,
        "/api/v1/orders",
        &body,
        &[("idempotency-key", "k-2")],
    ))
    .await;
    let before = app.counts().await;
    let mut other = body.clone();
    other["order"]["price"] = json!(1.0);

    let reply = app
        .send(json_request(
            Method::POST,
            "/api/v1/orders",
            &other,
            &[("idempotency-key", "k-2")],
        ))
        .await;

    let p = reply.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        p["type"],
        "urn:orders-center:problem:idempotency-key-reused"
    );
    assert_eq!(app.counts().await, before);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_create_one_order() {
    let app = TestApp::new().await;
    let body = without_id(sample_order("x"));

    let replies = futures::future::join_all((0..10).map(|_| {
        let (router, body) = (app.router.clone(), body.clone());
        async move {
            send(
                &router,
                json_request(
                    Method::POST,
                    "/api/v1/orders",
                    &body,
                    &[("idempotency-key", "burst")],
                ),
            )
            .await
        }
    }))
    .await;

    let ids: std::collections::HashSet<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, StatusCode::CREATED);
            r.json()["order"]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.header("idempotent-replayed").is_some())
            .count(),
        9
    );
    let c = app.counts().await;
    assert_eq!((c.orders, c.tasks), (1, 1));
}

#[tokio::test]
async fn creating_an_existing_id_is_409_and_writes_nothing() {
    let app = TestApp::new().await;
    app.put_order("ORD-9", &sample_order("ORD-9")).await;
    let before = app.counts().await;

    let reply = app
        .send(json_request(
            Method::POST,
            "/api/v1/orders",
            &sample_order("ORD-9"),
            &[],
        ))
        .await;

    reply.problem(StatusCode::CONFLICT);
    assert_eq!(app.counts().await, before);
}

#[tokio::test]
async fn a_create_that_fails_validation_leaves_its_key_free() {
    let app = TestApp::new().await;
    let mut bad = without_id(sample_order("x"));
    bad["order"]["price"] = json!(-5);
    let key = [("idempotency-key", "fix-and-retry")];

    app.send(json_request(Method::POST, "/api/v1/orders", &bad, &key))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    let fixed = app
        .send(json_request(
            Method::POST,
            "/api/v1/orders",
            &without_id(sample_order("x")),
            &key,
        ))
        .await;

    assert_eq!(fixed.status, StatusCode::CREATED);
    assert_eq!(fixed.header("idempotent-replayed"), None);
}

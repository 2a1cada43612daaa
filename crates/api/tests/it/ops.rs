use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use testkit::sample_order;

use crate::support::{json_request, send, TestApp};

#[tokio::test]
async fn health_and_readiness_answer_when_the_database_is_up() {
    let app = TestApp::new().await;
    assert_eq!(app.get("/healthz").await.json()["status"], "ok");
    assert_eq!(app.get("/readyz").await.json()["status"], "ready");
}

/// With the database gone, readiness and writes answer 503 problem+json
/// promptly, instead of hanging or answering 500.
#[tokio::test]
async fn a_missing_database_gives_prompt_503_problems() {
    let pool = store::connect_lazy(
        "postgres://postgres@127.0.0.1:1/none",
        &store::PoolConfig {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(1),
        },
    )
    .unwrap();
    let router = api::router(api::AppState::new(
        store::Store::new(pool),
        Default::default(),
    ));
    let started = Instant::now();

    let ready = send(
        &router,
        axum::http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    let save = send(
        &router,
        json_request(Method::PUT, "/api/v1/orders/X", &sample_order("X"), &[]),
    )
    .await;

    ready.problem(StatusCode::SERVICE_UNAVAILABLE);
    save.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(save.header("retry-after"), Some("1"));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn metrics_count_saves_by_route_template_never_by_order_id() {
    let app = TestApp::new().await;
    app.put_order("SECRET-ID-1", &sample_order("SECRET-ID-1"))
        .await;
    app.put_order("SECRET-ID-1", &sample_order("SECRET-ID-1"))
        .await;

    let text = String::from_utf8(app.get("/metrics").await.body.to_vec()).unwrap();

    assert!(text.contains(r#"orders_center_http_requests_total{method="PUT",route="/api/v1/orders/{id}",status="201"} 1"#), "{text}");
    assert!(text.contains(r#"orders_center_orders_saved_total{outcome="updated"} 1"#));
    assert!(text
        .lines()
        .any(|l| l == r#"orders_center_outbox_enqueued_total{destination="onec"} 2"#));
    assert!(!text.contains("SECRET-ID-1"));
}

/// Any token is a valid HTTP method, and each unknown one used to add
/// series to `/metrics` for good: 1,500 of them made one scrape 97 MB.
#[tokio::test]
async fn unknown_methods_and_routes_fold_into_one_label_value_each() {
    let app = TestApp::new().await;
    for i in 0..200 {
        let method = Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
        let path = if i % 2 == 0 {
            "/healthz".to_owned()
        } else {
            format!("/no/such/{i}")
        };
        send(
            &app.router,
            axum::http::Request::builder()
                .method(method)
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    }
    let text = String::from_utf8(app.get("/metrics").await.body.to_vec()).unwrap();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("orders_center_http_request"))
        .collect();
    assert!(
        !text.contains("M10X") && !text.contains("/no/such"),
        "{text}"
    );
    assert!(text.contains(r#"method="other""#), "{text}");
    assert!(text.contains(r#"route="unmatched""#), "{text}");
    // A fixed handful of series, not hundreds.
    assert!(
        series.len() < 60,
        "{} series:\n{}",
        series.len(),
        series.join("\n")
    );
}

#[tokio::test]
async fn sync_stats_count_the_backlog() {
    let app = TestApp::new().await;
    app.put_order("S1", &sample_order("S1")).await;
    app.put_order("S2", &sample_order("S2")).await;
    sqlx::query("UPDATE outbox SET state = 'dead', last_error = 'gone' WHERE aggregateid = 'S2'")
        .execute(&app.db.pool)
        .await
        .unwrap();

    let stats = app.get("/api/v1/sync/stats").await.json();

    assert_eq!(
        (
            stats["pending"].as_i64(),
            stats["running"].as_i64(),
            stats["dead"].as_i64()
        ),
        (Some(1), Some(0), Some(1))
    );
    assert!(stats["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_swagger_ui_serves_it() {
    let app = TestApp::new().await;

    let doc = app.get("/openapi.json").await.json();
    let docs = app.get("/docs/").await;

    for path in [
        "/api/v1/orders",
        "/api/v1/orders/{id}",
        "/api/v1/orders/{id}/history",
        "/api/v1/orders/{id}/status",
        "/api/v1/sync/stats",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    let payment_types = &doc["components"]["schemas"]["PaymentType"]["enum"];
    assert_eq!(payment_types.as_array().unwrap().len(), 8);
    assert_eq!(docs.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&docs.body).contains("swagger"));
}

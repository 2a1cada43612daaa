//! The HTTP client against a real local server: what it sends, and how each
//! kind of answer (and non-answer) is classified.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::put;
use axum::Router;
use onec::{
    Applied, Credentials, Delivery, ErrorClass, HttpOnecClient, OnecClient, OnecConfig, Outcome,
};

type Seen = Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>;

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client(addr: SocketAddr, timeout: Duration) -> HttpOnecClient {
    HttpOnecClient::new(&OnecConfig {
        base_url: format!("http://{addr}/"),
        credentials: Credentials {
            username: "relay".into(),
            password: "s3cret".into(),
        },
        timeout,
        max_idle_connections: 4,
    })
    .unwrap()
}

fn delivery() -> Delivery {
    Delivery {
        order_id: "ORD-1".into(),
        version: 3,
        snapshot: serde_json::value::RawValue::from_string(
            r#"{"order": {"id": "ORD-1", "price": 9999999999999.99}, "items": []}"#.into(),
        )
        .unwrap(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    }
}

fn failure(outcome: Outcome) -> onec::Failure {
    match outcome {
        Outcome::Failed(f) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_delivery_sends_the_contract_headers_and_body() {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let addr = serve(Router::new().route(
        "/hs/orders/v1/orders/{id}",
        put(
            move |headers: HeaderMap, body: axum::Json<serde_json::Value>| async move {
                s.lock().unwrap().push((headers, body.0));
                axum::Json(serde_json::json!({"result": "duplicate", "version": 3}))
            },
        ),
    ))
    .await;

    let outcome = client(addr, Duration::from_secs(5))
        .put_order(&delivery())
        .await;

    assert_eq!(outcome, Outcome::Delivered(Applied::Duplicate));
    let (headers, body) = seen.lock().unwrap().remove(0);
    assert_eq!(headers["idempotency-key"], "ORD-1:3");
    assert_eq!(
        headers["traceparent"],
        delivery().traceparent.unwrap().as_str()
    );
    // "relay:s3cret" in base64.
    assert_eq!(headers["authorization"], "Basic cmVsYXk6czNjcmV0");
    // The body is the WireOrder contract, its money digit for digit.
    let wire: onec::WireOrder<serde_json::Value> = serde_json::from_value(body).unwrap();
    assert_eq!(wire.version, 3);
    assert_eq!(
        wire.snapshot,
        serde_json::json!({"order": {"id": "ORD-1", "price": 9999999999999.99}, "items": []})
    );
    assert_eq!(
        wire.snapshot["order"]["price"].to_string(),
        "9999999999999.99"
    );
}

#[test]
fn a_body_is_the_snapshot_with_its_version_and_needs_an_object() {
    let mut d = delivery();
    d.snapshot = serde_json::value::RawValue::from_string("{ }".into()).unwrap();
    assert_eq!(d.body().as_deref(), Some(r#"{"version":3}"#));
    d.snapshot = serde_json::value::RawValue::from_string("[1]".into()).unwrap();
    assert_eq!(d.body(), None);
}

#[tokio::test]
async fn a_server_error_is_transient_and_keeps_retry_after() {
    let addr = serve(Router::new().route(
        "/hs/orders/v1/orders/{id}",
        put(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "4")],
                "maintenance",
            )
        }),
    ))
    .await;

    let f = failure(
        client(addr, Duration::from_secs(5))
            .put_order(&delivery())
            .await,
    );

    assert_eq!(f.class, ErrorClass::Unavailable);
    assert_eq!(f.retry_after, Some(Duration::from_secs(4)));
    assert!(f.detail.contains("maintenance"));
}

#[tokio::test]
async fn a_bad_request_is_permanent() {
    let addr = serve(Router::new().route(
        "/hs/orders/v1/orders/{id}",
        put(|| async { (StatusCode::BAD_REQUEST, "version must be positive").into_response() }),
    ))
    .await;

    let f = failure(
        client(addr, Duration::from_secs(5))
            .put_order(&delivery())
            .await,
    );

    assert_eq!(f.class, ErrorClass::Rejected);
    assert!(!f.is_transient());
}

#[tokio::test]
async fn no_answer_within_the_timeout_is_a_transient_timeout() {
    let addr = serve(Router::new().route(
        "/hs/orders/v1/orders/{id}",
        put(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }),
    ))
    .await;

    let f = failure(
        client(addr, Duration::from_millis(200))
            .put_order(&delivery())
            .await,
    );

    assert_eq!(f.class, ErrorClass::Timeout);
    assert!(f.is_transient());
}

#[tokio::test]
async fn a_closed_port_is_a_transient_connect_error() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };

    let f = failure(
        client(addr, Duration::from_secs(2))
            .put_order(&delivery())
            .await,
    );

    assert_eq!(f.class, ErrorClass::Connect);
}

/// A redirect is not followed: the other host never sees our credentials.
#[tokio::test]
async fn redirects_are_not_followed_so_credentials_stay_home() {
    let hits = Arc::new(Mutex::new(0));
    let h = hits.clone();
    let elsewhere = serve(Router::new().fallback(move || async move {
        *h.lock().unwrap() += 1;
        "stolen"
    }))
    .await;
    let addr = serve(Router::new().route(
        "/hs/orders/v1/orders/{id}",
        put(move || async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [("location", format!("http://{elsewhere}/grab"))],
            )
        }),
    ))
    .await;

    let f = failure(
        client(addr, Duration::from_secs(5))
            .put_order(&delivery())
            .await,
    );

    assert_eq!(f.class, ErrorClass::Redirect);
    assert_eq!(*hits.lock().unwrap(), 0);
}

#[test]
fn credentials_never_show_their_password() {
    let c = Credentials {
        username: "relay".into(),
        password: "s3cret".into(),
    };
    let config = OnecConfig {
        base_url: "http://x".into(),
        credentials: c,
        timeout: Duration::from_secs(1),
        max_idle_connections: 1,
    };
    assert!(!format!("{config:?}").contains("s3cret"));
    assert!(!format!("{:?}", HttpOnecClient::new(&config).unwrap()).contains("s3cret"));
}

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub struct TestApp {
    pub router: Router,
    pub db: testkit::TestDb,
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts an RFC 9457 answer with this status and returns its body.
    pub fn problem(&self, status: StatusCode) -> Value {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.header("content-type"), Some(api::PROBLEM_JSON));
        let p = self.json();
        assert_eq!(p["status"], status.as_u16());
        assert!(p["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:orders-center:problem:"));
        assert!(p["title"].is_string());
        p
    }
}

/// Row counts of every table a write can touch.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Counts {
    pub orders: i64,
    pub items: i64,
    pub payments: i64,
    pub history: i64,
    pub tasks: i64,
    pub idempotency_keys: i64,
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with_config(Default::default()).await
    }

    pub async fn with_config(config: api::ApiConfig) -> Self {
        Self::with_store(config, |s| s).await
    }

    /// An app whose store `adjust` configures.
    pub async fn with_store(
        config: api::ApiConfig,
        adjust: impl FnOnce(store::Store) -> store::Store,
    ) -> Self {
        let db = testkit::database().await;
        let state = api::AppState::new(adjust(store::Store::new(db.pool.clone())), config);
        Self {
            router: api::router(state),
            db,
        }
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        send(&self.router, req).await
    }

    pub async fn get(&self, uri: &str) -> Reply {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    pub async fn put_order(&self, id: &str, body: &Value) -> Reply {
        self.send(json_request(
            Method::PUT,
            &format!("/api/v1/orders/{id}"),
            body,
            &[],
        ))
        .await
    }

    pub async fn counts(&self) -> Counts {
        let (orders, items, payments, history, tasks, idempotency_keys) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_items),
                    (SELECT count(*) FROM order_payments), (SELECT count(*) FROM order_history),
                    (SELECT count(*) FROM outbox) + (SELECT count(*) FROM event_log),
                    (SELECT count(*) FROM idempotency_keys)",
        )
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        Counts {
            orders,
            items,
            payments,
            history,
            tasks,
            idempotency_keys,
        }
    }
}

pub async fn send(router: &Router, req: Request<Body>) -> Reply {
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub fn json_request(
    method: Method,
    uri: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

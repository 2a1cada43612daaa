//! The notifier against a real HTTP webhook on loopback: one notification
//! per order, retried until the webhook takes it, handed back to the
//! transport when it never does, and poison told apart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use inbox::{Consumer, ConsumerMetrics, Incoming, Verdict};
use notifier::{Notifier, Webhook};
use serde_json::{json, Value};

/// A webhook that answers 503 to its first `failures` calls, then 204, and
/// records what it took.
#[derive(Clone, Default)]
struct Hook {
    failures: Arc<Mutex<u32>>,
    taken: Arc<Mutex<Vec<(String, Value)>>>,
}

async fn receive(State(h): State<Hook>, headers: HeaderMap, Json(body): Json<Value>) -> StatusCode {
    let mut failures = h.failures.lock().unwrap();
    if *failures > 0 {
        *failures -= 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    h.taken.lock().unwrap().push((key, body));
    StatusCode::NO_CONTENT
}

async fn serve(hook: Hook) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new().route("/hook", post(receive)).with_state(hook);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn notifier(url: String, attempts: u32) -> Notifier {
    let metrics = ConsumerMetrics::register(&prometheus::Registry::new()).unwrap();
    Notifier::new(
        Some(Webhook {
            url,
            attempts,
            timeout: Duration::from_secs(2),
        }),
        metrics,
    )
    .unwrap()
}

fn message(id: &str, body: Value) -> Incoming {
    Incoming {
        id: Some(id.into()),
        payload: serde_json::to_vec(&body).unwrap(),
        origin: "test".into(),
        signature: None,
    }
}

#[tokio::test]
async fn each_outcome_is_posted_once_after_retries_and_poison_is_told_apart() {
    let hook = Hook::default();
    *hook.failures.lock().unwrap() = 2;
    let n = notifier(serve(hook.clone()).await, 5);
    let completed = json!({"type": "OrderCompleted", "order_id": "O-1", "amount": 150.5});
    let verdicts = n
        .process(&[
            message("m-1", completed.clone()),
            message("m-2", completed.clone()),
            message("m-3", json!({"type": "OrderCancelled", "order_id": "O-2", "reason": "insufficient funds"})),
            message("m-4", json!({"type": "StockReserved", "order_id": "O-3"})),
            message("m-5", json!({"type": "OrderCancelled", "order_id": "O-4"})),
        ])
        .await
        .unwrap();
    assert_eq!(
        verdicts[..3],
        [Verdict::Applied, Verdict::Duplicate, Verdict::Applied]
    );
    assert!(
        matches!(&verdicts[3], Verdict::Dead(p) if p.class == "unknown_type"),
        "{verdicts:?}"
    );
    assert!(
        matches!(&verdicts[4], Verdict::Dead(p) if p.class == "invalid"),
        "{verdicts:?}"
    );

    let taken = hook.taken.lock().unwrap().clone();
    assert_eq!(
        taken.len(),
        2,
        "two outcomes, each posted once after two 503s"
    );
    assert_eq!(taken[0].0, "O-1");
    assert_eq!(taken[0].1["outcome"], "completed");
    assert_eq!(taken[0].1["amount"], json!(150.5));
    assert_eq!(taken[1].0, "O-2");
    assert_eq!(taken[1].1["reason"], "insufficient funds");
    assert_eq!(n.notifications().len(), 2);
    assert_eq!(n.notification("O-2").unwrap().outcome, "cancelled");
}

#[tokio::test]
async fn a_webhook_that_stays_down_hands_the_batch_back_and_records_nothing() {
    let hook = Hook::default();
    *hook.failures.lock().unwrap() = u32::MAX;
    let n = notifier(serve(hook.clone()).await, 2);
    let e = n
        .process(&[message(
            "m-1",
            json!({"type": "OrderCompleted", "order_id": "O-1", "amount": 1}),
        )])
        .await
        .unwrap_err();
    assert!(matches!(e, inbox::Error::Downstream(_)), "{e}");
    assert!(
        n.notifications().is_empty(),
        "nothing recorded, so the redelivery is not a duplicate"
    );
    // The webhook comes back: the redelivered message goes through.
    *hook.failures.lock().unwrap() = 0;
    let verdicts = n
        .process(&[message(
            "m-1",
            json!({"type": "OrderCompleted", "order_id": "O-1", "amount": 1}),
        )])
        .await
        .unwrap();
    assert_eq!(verdicts, [Verdict::Applied]);
    assert_eq!(hook.taken.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn the_list_is_paged_with_a_link_to_the_next_page() {
    let metrics = ConsumerMetrics::register(&prometheus::Registry::new()).unwrap();
    let n = Arc::new(Notifier::new(None, metrics).unwrap());
    let batch: Vec<Incoming> = (1..=3)
        .map(|i| {
            message(
                &format!("m-{i}"),
                json!({"type": "OrderCompleted", "order_id": format!("O-{i}"), "amount": 1}),
            )
        })
        .collect();
    n.process(&batch).await.unwrap();
    let app = n.router();
    let get = |uri: &'static str| {
        let app = app.clone();
        async move {
            use tower::ServiceExt;
            let r = app
                .oneshot(
                    axum::http::Request::get(uri)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let link = r
                .headers()
                .get("link")
                .map(|v| v.to_str().unwrap().to_owned());
            let status = r.status();
            let body = http_body_util::BodyExt::collect(r.into_body())
                .await
                .unwrap()
                .to_bytes();
            (
                status,
                link,
                serde_json::from_slice::<Value>(&body).unwrap(),
            )
        }
    };
    let (status, link, page) = get("/api/v1/notifications?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["O-1", "O-2"]);
    assert_eq!(
        link.as_deref(),
        Some(r#"</api/v1/notifications?limit=2&after=O-2>; rel="next""#)
    );
    let (_, link, page) = get("/api/v1/notifications?limit=2&after=O-2").await;
    assert_eq!(page.as_array().map(Vec::len), Some(1));
    assert_eq!(link, None, "the last page names no next one");
    for bad in [
        "/api/v1/notifications?limit=0",
        "/api/v1/notifications?limit=1001",
        "/api/v1/notifications?after=a%20b",
    ] {
        assert_eq!(get(bad).await.0, StatusCode::BAD_REQUEST, "{bad}");
    }
}

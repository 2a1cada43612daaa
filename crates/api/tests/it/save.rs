use axum::http::{Method, StatusCode};
use serde_json::json;
use testkit::{sample_order, sample_order_with};

use crate::support::{json_request, send, Counts, TestApp};

#[tokio::test]
async fn a_save_writes_the_order_its_lines_history_and_exactly_one_task_with_the_snapshot() {
    let app = TestApp::new().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let reply = app
        .send(json_request(
            Method::PUT,
            "/api/v1/orders/ORD-1",
            &sample_order("ORD-1"),
            &[("traceparent", traceparent), ("x-user-id", "clerk-5")],
        ))
        .await;

    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.header("etag"), Some("\"1\""));
    assert_eq!(reply.header("location"), Some("/api/v1/orders/ORD-1"));
    assert_eq!(
        app.counts().await,
        Counts {
            orders: 1,
            items: 3,
            payments: 2,
            history: 2,
            tasks: 1,
            idempotency_keys: 0
        }
    );
    let body = reply.json();
    assert_eq!(body["version"], 1);
    assert_eq!(body["sync"]["state"], "pending");
    assert_eq!(body["order"]["price"], 150.5);
    assert_eq!(body["payments"][1]["credit_data"]["iin"], "990101300123");
    assert_eq!(body["history"][0]["user_id"], "clerk-5");

    let (order_id, version, state, snapshot, stored_trace): (
        String,
        i64,
        String,
        serde_json::Value,
        Option<String>,
    ) = sqlx::query_as("SELECT aggregateid, version, state, payload, traceparent FROM outbox")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        (order_id.as_str(), version, state.as_str()),
        ("ORD-1", 1, "pending")
    );
    assert_eq!(
        stored_trace.as_deref().and_then(telemetry::trace_id),
        telemetry::trace_id(traceparent),
        "the task continues the save's trace"
    );
    // The snapshot is the committed order exactly as the API returns it.
    for part in ["order", "items", "payments", "history"] {
        assert_eq!(snapshot[part], body[part], "snapshot {part}");
    }
}

#[tokio::test]
async fn a_second_save_bumps_the_version_replaces_lines_and_records_the_changes() {
    let app = TestApp::new().await;
    app.put_order("ORD-2", &sample_order("ORD-2")).await;
    let mut next = sample_order_with("ORD-2", "paid", 99.99);
    next["items"].as_array_mut().unwrap().truncate(1);

    let reply = app.put_order("ORD-2", &next).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("etag"), Some("\"2\""));
    let body = reply.json();
    assert_eq!(body["version"], 2);
    let history = body["history"].as_array().unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(history[2]["type"], "status");
    assert_eq!(
        (history[2]["old_value"].clone(), history[2]["value"].clone()),
        (json!("new"), json!("paid"))
    );
    assert_eq!(history[3]["type"], "price");
    assert_eq!(
        (history[3]["old_value"].clone(), history[3]["value"].clone()),
        (json!(150.5), json!(99.99))
    );
    assert_eq!(history[3]["version"], 2);
    let c = app.counts().await;
    assert_eq!(
        (c.orders, c.items, c.payments, c.history, c.tasks),
        (1, 1, 2, 4, 1)
    );
    // No relay claimed version 1's row, so version 2 coalesced into it.
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM outbox ORDER BY id")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(versions, [2]);
}

#[tokio::test]
async fn an_unchanged_save_is_versioned_and_queued_but_adds_no_history() {
    let app = TestApp::new().await;
    app.put_order("ORD-3", &sample_order("ORD-3")).await;

    let reply = app.put_order("ORD-3", &sample_order("ORD-3")).await;

    assert_eq!(reply.json()["version"], 2);
    let c = app.counts().await;
    assert_eq!((c.history, c.tasks), (2, 1), "one pending 1C row per order");
}

#[tokio::test]
async fn if_match_on_another_version_is_412_and_writes_nothing() {
    let app = TestApp::new().await;
    app.put_order("ORD-4", &sample_order("ORD-4")).await;
    let before = app.counts().await;

    let reply = app
        .send(json_request(
            Method::PUT,
            "/api/v1/orders/ORD-4",
            &sample_order_with("ORD-4", "paid", 1.0),
            &[("if-match", "\"7\"")],
        ))
        .await;

    let problem = reply.problem(StatusCode::PRECONDITION_FAILED);
    assert_eq!(problem["current_version"], 1);
    assert_eq!(app.counts().await, before);
    assert_eq!(
        app.get("/api/v1/orders/ORD-4").await.json()["order"]["status"],
        "new"
    );
}

#[tokio::test]
async fn if_match_on_the_current_version_saves_and_if_none_match_refuses_an_existing_order() {
    let app = TestApp::new().await;
    app.put_order("ORD-5", &sample_order("ORD-5")).await;

    let ok = app
        .send(json_request(
            Method::PUT,
            "/api/v1/orders/ORD-5",
            &sample_order("ORD-5"),
            &[("if-match", "\"1\"")],
        ))
        .await;
    assert_eq!(ok.status, StatusCode::OK);

    let absent_only = app
        .send(json_request(
            Method::PUT,
            "/api/v1/orders/ORD-5",
            &sample_order("ORD-5"),
            &[("if-none-match", "*")],
        ))
        .await;
    absent_only.problem(StatusCode::PRECONDITION_FAILED);

    let missing = app
        .send(json_request(
            Method::PUT,
            "/api/v1/orders/NEW-1",
            &sample_order("NEW-1"),
            &[("if-match", "\"1\"")],
        ))
        .await;
    missing.problem(StatusCode::PRECONDITION_FAILED);
    let any_version_of_missing = app
        .send(json_request(
            Method::PUT,
            "/api/v1/orders/NEW-2",
            &sample_order("NEW-2"),
            &[("if-match", "*")],
        ))
        .await;
    any_version_of_missing.problem(StatusCode::PRECONDITION_FAILED);
    assert_eq!(app.counts().await.orders, 1);
}

/// Read-modify-write clients racing on one order with If-Match: each one's
/// increment lands exactly once, so the final price counts every success.
#[tokio::test]
async fn concurrent_conditional_saves_never_lose_an_update() {
    let app = TestApp::new().await;
    app.put_order("HOT", &sample_order_with("HOT", "new", 0.0))
        .await;
    let (clients, increments) = (8, 5);

    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let router = app.router.clone();
            tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..increments {
                    loop {
                        let current = send(
                            &router,
                            axum::http::Request::get("/api/v1/orders/HOT")
                                .body(axum::body::Body::empty())
                                .unwrap(),
                        )
                        .await
                        .json();
                        let version = current["version"].as_i64().unwrap();
                        let price = current["order"]["price"].as_f64().unwrap() + 1.0;
                        let reply = send(
                            &router,
                            json_request(
                                Method::PUT,
                                "/api/v1/orders/HOT",
                                &sample_order_with("HOT", "new", price),
                                &[("if-match", &format!("\"{version}\""))],
                            ),
                        )
                        .await;
                        match reply.status {
                            StatusCode::OK => break,
                            StatusCode::PRECONDITION_FAILED => conflicts += 1,
                            other => panic!("unexpected {other}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: i32 = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();

    let total = clients * increments;
    let order = app.get("/api/v1/orders/HOT").await.json();
    assert_eq!(order["order"]["price"], f64::from(total));
    assert_eq!(order["version"], i64::from(total) + 1);
    assert!(conflicts > 0, "the clients should have raced at least once");
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM outbox ORDER BY version")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        versions,
        [i64::from(total) + 1],
        "1C's pending row: the last version"
    );
}

/// Blind saves of one order from many clients: each gets its own version,
/// and 1C's one pending row ends at the last.
#[tokio::test]
async fn concurrent_blind_saves_each_get_their_own_version_and_1c_the_last() {
    let app = TestApp::new().await;
    let n = 16;

    let replies = futures::future::join_all((0..n).map(|i| {
        let router = app.router.clone();
        async move {
            send(
                &router,
                json_request(
                    Method::PUT,
                    "/api/v1/orders/RACE",
                    &sample_order_with("RACE", "new", f64::from(i)),
                    &[],
                ),
            )
            .await
        }
    }))
    .await;

    let mut versions: Vec<i64> = replies
        .iter()
        .map(|r| {
            assert!(r.status.is_success(), "{:?}", r);
            r.json()["version"].as_i64().unwrap()
        })
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=i64::from(n)).collect::<Vec<_>>());
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.status == StatusCode::CREATED)
            .count(),
        1
    );
    let c = app.counts().await;
    assert_eq!((c.orders, c.tasks, c.items), (1, 1, 3));
    let pending: i64 = sqlx::query_scalar("SELECT version FROM outbox")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(pending, i64::from(n));
}

#[tokio::test]
async fn sql_looking_and_unicode_text_is_stored_verbatim() {
    let app = TestApp::new().await;
    let mut body = sample_order("ORD-SQL");
    let nasty = "'); DROP TABLE orders; -- Алматы 🚚 \"quoted\" \\ back";
    body["order"]["city"] = json!(nasty);
    body["payments"][0]["info"] = json!("line1\nline2\ttab");

    assert_eq!(
        app.put_order("ORD-SQL", &body).await.status,
        StatusCode::CREATED
    );

    let stored = app.get("/api/v1/orders/ORD-SQL").await.json();
    assert_eq!(stored["order"]["city"], nasty);
    assert_eq!(stored["payments"][0]["info"], "line1\nline2\ttab");
    assert_eq!(app.counts().await.orders, 1);
}

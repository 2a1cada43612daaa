use std::collections::HashSet;

use axum::http::{Method, StatusCode};
use serde_json::json;
use testkit::{sample_order, sample_order_with};

use crate::support::{json_request, send, TestApp};

#[tokio::test]
async fn get_returns_the_order_with_its_version_and_sync_state() {
    let app = TestApp::new().await;
    app.put_order("ORD-1", &sample_order("ORD-1")).await;

    let reply = app.get("/api/v1/orders/ORD-1").await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("etag"), Some("\"1\""));
    let body = reply.json();
    assert_eq!(body["order"]["id"], "ORD-1");
    assert_eq!(body["items"].as_array().unwrap().len(), 3);
    assert_eq!(body["items"][0]["product_id"], "P-1");
    assert_eq!(body["items"][2]["gift"], true);
    assert_eq!(
        body["payments"][0]["card_payment_data"]["transaction_id"],
        "T1"
    );
    assert_eq!(body["sync"]["version"], 1);
    assert_eq!(body["sync"]["state"], "pending");
    assert_eq!(body["sync"]["attempts"], 0);
}

#[tokio::test]
async fn unknown_orders_are_404_problems() {
    let app = TestApp::new().await;
    app.get("/api/v1/orders/NOPE")
        .await
        .problem(StatusCode::NOT_FOUND);
    app.get("/api/v1/orders/NOPE/history")
        .await
        .problem(StatusCode::NOT_FOUND);
    app.send(json_request(
        Method::POST,
        "/api/v1/orders/NOPE/status",
        &json!({"status": "paid"}),
        &[],
    ))
    .await
    .problem(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_status_change_is_versioned_recorded_and_queued_and_keeps_the_lines() {
    let app = TestApp::new().await;
    app.put_order("ORD-2", &sample_order("ORD-2")).await;

    let reply = app
        .send(json_request(
            Method::POST,
            "/api/v1/orders/ORD-2/status",
            &json!({"status": "shipped", "user_id": "ops-1"}),
            &[("if-match", "\"1\"")],
        ))
        .await;

    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(
        (body["version"].clone(), body["order"]["status"].clone()),
        (json!(2), json!("shipped"))
    );
    assert_eq!(body["items"].as_array().unwrap().len(), 3);
    let history = app.get("/api/v1/orders/ORD-2/history").await.json();
    let last = history.as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            last["type"].clone(),
            last["old_value"].clone(),
            last["value"].clone(),
            last["user_id"].clone()
        ),
        (
            json!("status"),
            json!("new"),
            json!("shipped"),
            json!("ops-1")
        )
    );
    let c = app.counts().await;
    // The status change coalesced into the order's pending 1C row.
    assert_eq!((c.tasks, c.items, c.history), (1, 3, 3));

    let stale = app
        .send(json_request(
            Method::POST,
            "/api/v1/orders/ORD-2/status",
            &json!({"status": "lost"}),
            &[("if-match", "\"1\"")],
        ))
        .await;
    stale.problem(StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn list_filters_by_status_city_and_update_time() {
    let app = TestApp::new().await;
    app.put_order("A", &sample_order_with("A", "new", 1.0))
        .await;
    app.put_order("B", &sample_order_with("B", "paid", 1.0))
        .await;
    let mut c = sample_order_with("C", "paid", 1.0);
    c["order"]["city"] = json!("Astana");
    app.put_order("C", &c).await;
    let ids = |v: serde_json::Value| -> Vec<String> {
        v["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["order"]["id"].as_str().unwrap().to_owned())
            .collect()
    };

    assert_eq!(
        ids(app.get("/api/v1/orders?status=paid").await.json()),
        ["B", "C"]
    );
    assert_eq!(
        ids(app
            .get("/api/v1/orders?status=paid&city=Astana")
            .await
            .json()),
        ["C"]
    );
    assert_eq!(
        ids(app
            .get("/api/v1/orders?updated_since=2999-01-01T00:00:00Z")
            .await
            .json()),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(app
            .get("/api/v1/orders?updated_since=2000-01-01T00:00:00Z")
            .await
            .json()),
        ["A", "B", "C"]
    );
    let page = app.get("/api/v1/orders").await.json();
    assert_eq!(page["orders"][0]["version"], 1);
    assert!(page["next_cursor"].is_null());
}

/// Walks the list in small pages while another task keeps inserting orders:
/// every order that existed before the walk appears exactly once.
#[tokio::test]
async fn pagination_returns_every_order_exactly_once_while_orders_are_inserted() {
    let app = TestApp::new().await;
    let existing: Vec<String> = (0..60).map(|i| format!("PRE-{i:03}")).collect();
    for id in &existing {
        app.put_order(id, &sample_order(id)).await;
    }
    let router = app.router.clone();
    let writer = tokio::spawn(async move {
        for i in 0..60 {
            let id = format!("NEW-{i:03}");
            let r = send(
                &router,
                json_request(
                    Method::PUT,
                    &format!("/api/v1/orders/{id}"),
                    &sample_order(&id),
                    &[],
                ),
            )
            .await;
            assert_eq!(r.status, StatusCode::CREATED);
            // Updating already-listed orders must not make them reappear.
            let pre = format!("PRE-{:03}", i % 60);
            send(
                &router,
                json_request(
                    Method::PUT,
                    &format!("/api/v1/orders/{pre}"),
                    &sample_order(&pre),
                    &[],
                ),
            )
            .await;
        }
    });

    let mut seen = Vec::new();
    let mut uri = "/api/v1/orders?limit=7".to_owned();
    loop {
        let page = app.get(&uri).await.json();
        seen.extend(
            page["orders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["order"]["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/v1/orders?limit=7&cursor={c}"),
            None => break,
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no order may appear twice");
    for id in &existing {
        assert!(unique.contains(id), "{id} missing");
    }
}

#[tokio::test]
async fn bad_list_parameters_are_400_problems() {
    let app = TestApp::new().await;
    for uri in [
        "/api/v1/orders?limit=0",
        "/api/v1/orders?limit=501",
        "/api/v1/orders?limit=ten",
        "/api/v1/orders?cursor=forged",
        "/api/v1/orders?updated_since=yesterday",
    ] {
        app.get(uri).await.problem(StatusCode::BAD_REQUEST);
    }
}

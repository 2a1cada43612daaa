//! A checkout on create starts the order's saga; a bad one, or one where
//! no saga runs, is a 4xx that writes nothing.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use store::saga::{SagaConfig, SagaRoute};

use crate::support::{json_request, TestApp};

async fn with_sagas() -> TestApp {
    TestApp::with_store(Default::default(), |s| {
        s.with_saga(SagaConfig {
            route: Some(SagaRoute::Local),
            ..SagaConfig::default()
        })
    })
    .await
}

fn order_with_checkout(id: &str, checkout: Value) -> Value {
    let mut body = testkit::sample_order(id);
    body["checkout"] = checkout;
    body
}

fn good_checkout() -> Value {
    json!({"account_id": "acc-1", "reserve": [{"product_id": "sku-1", "quantity": 2}]})
}

async fn post(app: &TestApp, body: &Value) -> crate::support::Reply {
    app.send(json_request(Method::POST, "/api/v1/orders", body, &[]))
        .await
}

async fn sagas(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sagas")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_checkout_starts_the_saga_and_its_chain() {
    let app = with_sagas().await;
    let res = post(&app, &order_with_checkout("SG-1", good_checkout())).await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.json());
    let order = res.json();
    assert_eq!(
        order["order"]["status"], "pending",
        "the saga owns the status"
    );
    assert!(order.get("checkout").is_none(), "never returned");

    let states = app.get("/api/v1/orders/SG-1/states").await;
    assert_eq!(states.status, StatusCode::OK);
    let chain = states.json();
    assert_eq!(chain.as_array().unwrap().len(), 1);
    assert_eq!(chain[0]["step"], "ORDER_CREATED");
    assert!(chain[0]["idempotency_key"].is_string());
    assert!(chain[0]["at"].is_string());

    let (kind, destination, payload): (String, String, Value) = sqlx::query_as(
        "SELECT type, destination, payload FROM event_log WHERE aggregatetype = 'reserve.commands'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (kind.as_str(), destination.as_str()),
        ("ReserveStock", "inventory")
    );
    assert_eq!(
        payload["lines"],
        json!([{"product_id": "sku-1", "quantity": 2}])
    );
    // 1C gets the order as before, without the checkout.
    let snapshot: Value =
        sqlx::query_scalar("SELECT payload FROM outbox WHERE destination = 'onec'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(snapshot.get("checkout").is_none());
}

#[tokio::test]
async fn an_order_without_a_checkout_has_no_saga_and_an_empty_chain() {
    let app = with_sagas().await;
    let res = post(&app, &testkit::sample_order("PLAIN-1")).await;
    assert_eq!(res.status, StatusCode::CREATED);
    assert_eq!(res.json()["order"]["status"], "new");
    let states = app.get("/api/v1/orders/PLAIN-1/states").await;
    assert_eq!(states.json(), json!([]));
    assert_eq!(sagas(&app).await, 0);
    app.get("/api/v1/orders/NOPE/states")
        .await
        .problem(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_bad_checkout_is_a_422_naming_each_field_and_writes_nothing() {
    let app = with_sagas().await;
    let before = app.counts().await;
    for (checkout, field) in [
        (
            json!({"account_id": "acc-1", "reserve": [{"product_id": "sku-1", "quantity": -1}]}),
            "checkout.reserve[0].quantity",
        ),
        (
            json!({"account_id": "acc-1", "reserve": [{"product_id": "sku-1", "quantity": 0}]}),
            "checkout.reserve[0].quantity",
        ),
        (
            json!({"account_id": "acc-1", "reserve": []}),
            "checkout.reserve",
        ),
        (
            json!({"account_id": "", "reserve": [{"product_id": "sku-1", "quantity": 1}]}),
            "checkout.account_id",
        ),
        (
            json!({"account_id": "acc-1", "reserve": [{"product_id": "bad id", "quantity": 1}]}),
            "checkout.reserve[0].product_id",
        ),
        (
            json!({"account_id": "acc-1", "reserve": [{"product_id": "a", "quantity": 1}, {"product_id": "a", "quantity": 1}]}),
            "checkout.reserve[1].product_id",
        ),
    ] {
        let problem = post(&app, &order_with_checkout("BAD-1", checkout.clone()))
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY);
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{checkout}");
    }
    let mut free = order_with_checkout("BAD-2", good_checkout());
    free["order"]["price"] = json!(0);
    let problem = post(&app, &free)
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"][0]["field"], "order.price");
    // Not a number of units at all: the body's shape is wrong.
    post(
        &app,
        &order_with_checkout(
            "BAD-3",
            json!({"account_id": "a", "reserve": [{"product_id": "a", "quantity": "2"}]}),
        ),
    )
    .await
    .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.counts().await, before);
    assert_eq!(sagas(&app).await, 0);
}

#[tokio::test]
async fn a_checkout_on_an_existing_order_conflicts_and_where_no_saga_runs_it_is_refused() {
    let app = with_sagas().await;
    assert_eq!(
        app.put_order("EX-1", &testkit::sample_order("EX-1"))
            .await
            .status,
        StatusCode::CREATED
    );
    let before = app.counts().await;
    app.put_order("EX-1", &order_with_checkout("EX-1", good_checkout()))
        .await
        .problem(StatusCode::CONFLICT);
    assert_eq!(app.counts().await, before);

    let plain = TestApp::new().await;
    let problem = post(&plain, &order_with_checkout("NS-1", good_checkout()))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("runs no sagas"),
        "{problem}"
    );
    assert_eq!(plain.counts().await.orders, 0);
}

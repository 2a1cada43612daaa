//! Money is exact end to end: the JSON body, PostgreSQL's NUMERIC, the
//! answer, and the snapshot queued for 1C carry the same digits.

use serde_json::Value;

use crate::support::TestApp;

/// A sample order whose numbers are given as raw JSON text, so no float
/// ever touches them on the way in.
fn body(id: &str, price: &str, sums: [&str; 2]) -> String {
    let mut order = testkit::sample_order(id);
    order["order"]["price"] = Value::from(333_333);
    order["payments"][0]["sum"] = Value::from(111_111);
    order["payments"][1]["sum"] = Value::from(222_222);
    serde_json::to_string(&order)
        .unwrap()
        .replace("333333", price)
        .replace("111111", sums[0])
        .replace("222222", sums[1])
}

async fn put_raw(app: &TestApp, id: &str, body: String) -> String {
    let reply = app
        .send(
            axum::http::Request::put(format!("/api/v1/orders/{id}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    String::from_utf8(reply.body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_tenth_and_two_tenths_are_stored_and_returned_as_three_tenths() {
    let app = TestApp::new().await;
    let answer = put_raw(&app, "CENTS", body("CENTS", "0.3", ["0.1", "0.2"])).await;

    assert!(answer.contains(r#""price":0.3,"#), "{answer}");
    assert!(answer.contains(r#""sum":0.1,"#) && answer.contains(r#""sum":0.2,"#));
    let (sum, price, equal): (String, String, bool) = sqlx::query_as(
        "SELECT sum(p.sum)::text, o.price::text, sum(p.sum) = o.price
         FROM orders o JOIN order_payments p ON p.order_id = o.id
         WHERE o.id = 'CENTS' GROUP BY o.price",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (sum.as_str(), price.as_str(), equal),
        ("0.30", "0.30", true)
    );
    let read = String::from_utf8(app.get("/api/v1/orders/CENTS").await.body.to_vec()).unwrap();
    assert!(read.contains(r#""price":0.3,"#), "{read}");
}

#[tokio::test]
async fn the_largest_amount_round_trips_exactly_to_the_database_the_answer_and_1c() {
    let app = TestApp::new().await;
    let max = "9999999999999.99";
    let answer = put_raw(&app, "MAX", body("MAX", max, [max, "0.01"])).await;

    assert!(answer.contains(&format!(r#""price":{max},"#)), "{answer}");
    let stored: String = sqlx::query_scalar("SELECT price::text FROM orders WHERE id = 'MAX'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, max);
    // The snapshot 1C will receive, as the outbox holds it.
    let queued: String = sqlx::query_scalar(
        "SELECT payload::text FROM outbox WHERE aggregateid = 'MAX' AND destination = 'onec'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(queued.contains(&format!(r#""price": {max}"#)), "{queued}");
    assert!(queued.contains(&format!(r#""sum": {max}"#)), "{queued}");
    let snapshot: Value = serde_json::from_str(&queued).unwrap();
    let wire = serde_json::to_string(&onec::WireOrder {
        version: 1,
        snapshot: &snapshot,
    })
    .unwrap();
    assert!(wire.contains(&format!(r#""price":{max}"#)), "{wire}");
    let history =
        String::from_utf8(app.get("/api/v1/orders/MAX/history").await.body.to_vec()).unwrap();
    assert!(history.contains(&format!(r#""value":{max}"#)), "{history}");
}

#[tokio::test]
async fn a_third_cent_is_refused_with_the_field_named() {
    let app = TestApp::new().await;
    let reply = app
        .send(
            axum::http::Request::put("/api/v1/orders/FINE")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body("FINE", "10.005", ["10", "0"])))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, 422);
    let problem = reply.json();
    assert!(
        problem.to_string().contains("order.price")
            && problem.to_string().contains("at most two decimal places"),
        "{problem}"
    );
    assert_eq!(app.counts().await.orders, 0);
}

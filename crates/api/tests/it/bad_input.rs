use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use testkit::sample_order;

use crate::support::{json_request, TestApp};

fn raw(
    method: Method,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    b.body(body.into()).unwrap()
}

fn put_raw(body: impl Into<Body>) -> Request<Body> {
    raw(
        Method::PUT,
        "/api/v1/orders/EXISTING",
        Some("application/json"),
        body,
    )
}

fn put_with(edit: impl FnOnce(&mut Value)) -> Request<Body> {
    let mut body = sample_order("EXISTING");
    edit(&mut body);
    json_request(Method::PUT, "/api/v1/orders/EXISTING", &body, &[])
}

/// Every case is a request that must be refused with a 4xx problem+json,
/// leaving every table exactly as it was.
#[tokio::test]
async fn bad_input_gets_a_4xx_problem_and_writes_nothing() {
    let app = TestApp::new().await;
    app.put_order("EXISTING", &sample_order("EXISTING")).await;
    let before = app.counts().await;
    let valid = serde_json::to_string(&sample_order("EXISTING")).unwrap();
    // Under an ignored field, so the parser must walk all of it without
    // overflowing its stack; then the missing `order` is reported.
    let deep = format!(
        "{{\"pad\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );

    let cases: Vec<(&str, Request<Body>, StatusCode)> = vec![
        (
            "malformed JSON",
            put_raw("{\"order\": {"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "trailing garbage",
            put_raw(format!("{valid} xyz")),
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid UTF-8",
            put_raw(vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}']),
            StatusCode::BAD_REQUEST,
        ),
        (
            "NaN literal",
            put_raw(valid.replace("150.5", "NaN")),
            StatusCode::BAD_REQUEST,
        ),
        (
            "deeply nested JSON",
            put_raw(deep),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            // Valid JSON, read digit for digit, but no amount.
            "huge number",
            put_raw(valid.replace("150.5", "1e400")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "JSON array body",
            put_raw("[]"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "wrong type",
            put_with(|b| b["order"]["price"] = json!("cheap")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing required field",
            put_with(|b| {
                b["order"].as_object_mut().unwrap().remove("general_id");
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown payment type",
            put_with(|b| b["payments"][0]["type"] = json!("barter")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "months out of i16 range",
            put_with(|b| b["payments"][1]["credit_data"]["number_of_months"] = json!(40000)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative price",
            put_with(|b| b["order"]["price"] = json!(-1)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "sub-cent amount",
            put_with(|b| b["items"][0]["price"] = json!(1.001)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "price beyond NUMERIC(15,2)",
            put_with(|b| b["order"]["price"] = json!(1e15)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "empty status",
            put_with(|b| b["order"]["status"] = json!("")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "empty product id",
            put_with(|b| b["items"][0]["product_id"] = json!("")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "nil payment id",
            put_with(|b| b["payments"][0]["id"] = json!("00000000-0000-0000-0000-000000000000")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "NUL byte in text",
            put_with(|b| b["order"]["city"] = json!("a\u{0}b")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "NUL byte in the status filter",
            raw(
                Method::GET,
                "/api/v1/orders?status=%00",
                None,
                Body::empty(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "NUL byte in the city filter",
            raw(
                Method::GET,
                "/api/v1/orders?city=a%00b",
                None,
                Body::empty(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "NUL byte in a cursor",
            raw(
                Method::GET,
                "/api/v1/orders?cursor=%00",
                None,
                Body::empty(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "NUL byte in a task state",
            raw(
                Method::GET,
                "/api/v1/sync/tasks?state=%00",
                None,
                Body::empty(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "NUL byte in a new status",
            json_request(
                Method::POST,
                "/api/v1/orders/EXISTING/status",
                &json!({"status": "paid\u{0}", "user_id": "u"}),
                &[],
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "NUL byte in the status change's user",
            json_request(
                Method::POST,
                "/api/v1/orders/EXISTING/status",
                &json!({"status": "paid", "user_id": "u\u{0}"}),
                &[],
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "NUL byte in a product id",
            put_with(|b| b["items"][0]["product_id"] = json!("p\u{0}")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "body id differs from path",
            put_with(|b| b["order"]["id"] = json!("OTHER")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "credit without terms",
            put_with(|b| {
                b["payments"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("credit_data");
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "too many items",
            put_with(|b| {
                b["items"] = json!(vec![
                    json!({"product_id": "p", "base_price": 1, "price": 1});
                    501
                ])
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "oversized body",
            put_raw(format!("{{\"pad\": \"{}\"}}", "x".repeat(10 * 1024 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "text/plain content type",
            raw(
                Method::PUT,
                "/api/v1/orders/EXISTING",
                Some("text/plain"),
                valid.clone(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "missing content type",
            raw(Method::PUT, "/api/v1/orders/EXISTING", None, valid.clone()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "path traversal id",
            raw(
                Method::PUT,
                "/api/v1/orders/..%2F..%2Fetc%2Fpasswd",
                Some("application/json"),
                valid.clone(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "id with spaces",
            raw(
                Method::PUT,
                "/api/v1/orders/a%20b",
                Some("application/json"),
                valid.clone(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "overlong id",
            raw(
                Method::PUT,
                &format!("/api/v1/orders/{}", "x".repeat(65)),
                Some("application/json"),
                valid.clone(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "garbage If-Match",
            json_request(
                Method::PUT,
                "/api/v1/orders/EXISTING",
                &sample_order("EXISTING"),
                &[("if-match", "yesterday")],
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "control chars in X-User-Id",
            json_request(
                Method::PUT,
                "/api/v1/orders/EXISTING",
                &sample_order("EXISTING"),
                &[("x-user-id", "a\tb")],
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "Idempotency-Key with spaces",
            json_request(
                Method::POST,
                "/api/v1/orders",
                &sample_order("NEW"),
                &[("idempotency-key", "a b")],
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty status change",
            json_request(
                Method::POST,
                "/api/v1/orders/EXISTING/status",
                &json!({"status": ""}),
                &[],
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "status change without status",
            json_request(
                Method::POST,
                "/api/v1/orders/EXISTING/status",
                &json!({}),
                &[],
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unsupported method",
            raw(Method::DELETE, "/api/v1/orders/EXISTING", None, ""),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "unknown route",
            raw(
                Method::POST,
                "/api/v1/nowhere",
                Some("application/json"),
                "{}",
            ),
            StatusCode::NOT_FOUND,
        ),
    ];

    for (name, request, status) in cases {
        let reply = app.send(request).await;
        assert_eq!(
            reply.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let problem = reply.problem(status);
        assert!(
            problem["detail"].is_string() || status.as_u16() == 405,
            "{name}: no detail"
        );
        assert_eq!(app.counts().await, before, "{name} wrote something");
    }
}

#[tokio::test]
async fn validation_problems_list_every_broken_field() {
    let app = TestApp::new().await;

    let reply = app
        .send(put_with(|b| {
            b["order"]["status"] = json!("");
            b["items"][1]["price"] = json!(-3);
        }))
        .await;

    let p = reply.problem(StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["order.status", "items[1].price"]);
    assert_eq!(p["type"], "urn:orders-center:problem:validation-failed");
}

//! inventory's HTTP API over real PostgreSQL: stock levels, and
//! problem+json answers that write nothing.

use axum::http::{Method, StatusCode};
use serde_json::json;
use testkit::http::call;

#[tokio::test]
async fn stock_is_set_and_read_and_bad_input_writes_nothing() {
    let db = testkit::unmigrated_database().await;
    inventory::migrate(&db.pool).await.unwrap();
    let app = inventory::http::router(db.pool.clone());

    let (status, _, body) = call(
        &app,
        Method::PUT,
        "/api/v1/stock/sku-1",
        Some(json!({"available": 7})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"product_id": "sku-1", "available": 7, "reserved": 0, "sold": 0})
    );
    let (_, _, body) = call(&app, Method::GET, "/api/v1/stock", None).await;
    assert_eq!(body.as_array().map(Vec::len), Some(1));

    let cases = [
        (
            Method::GET,
            "/api/v1/stock/unknown",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PUT,
            "/api/v1/stock/sku-1",
            Some(json!({"available": -1})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::PUT,
            "/api/v1/stock/sku-1",
            Some(json!({"available": 1.5})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::PUT,
            "/api/v1/stock/bad%20id",
            Some(json!({"available": 1})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/api/v1/stock/a%00b",
            Some(json!({"available": 1})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/v1/stock/a%00b",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/api/v1/reservations/a%00b",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/api/v1/stock/sku-1",
            Some(json!({"available": 9_223_372_036_854_775_807_i64})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::PUT,
            "/api/v1/stock/sku-1",
            Some(json!({"available": 1_000_000_000_001_i64})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::PUT,
            "/api/v1/stock/sku-2",
            Some(json!({"available": 1, "extra": true})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::GET,
            "/api/v1/reservations/ORD-1",
            None,
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, uri, body, want) in cases {
        let (status, content_type, problem) = call(&app, method.clone(), uri, body.clone()).await;
        assert_eq!(status, want, "{method} {uri} {body:?}: {problem}");
        assert_eq!(content_type, api::PROBLEM_JSON, "{method} {uri}");
    }
    let (_, _, body) = call(&app, Method::GET, "/api/v1/stock/sku-1", None).await;
    assert_eq!(
        body["available"],
        json!(7),
        "a refused update changes nothing"
    );
    let (_, _, body) = call(&app, Method::GET, "/api/v1/stock", None).await;
    assert_eq!(
        body.as_array().map(Vec::len),
        Some(1),
        "and creates nothing"
    );
}

#[tokio::test]
async fn a_release_always_fits_because_free_and_reserved_stay_within_the_maximum() {
    use inventory::stock::{self, MAX_STOCK};
    let db = testkit::unmigrated_database().await;
    inventory::migrate(&db.pool).await.unwrap();
    stock::set_available(&db.pool, "p", 10)
        .await
        .unwrap()
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let line = saga::Line {
        product_id: "p".into(),
        quantity: 2,
    };
    stock::reserve(&mut conn, "ORD-1", &[line]).await.unwrap();
    assert_eq!(
        stock::set_available(&db.pool, "p", MAX_STOCK - 1)
            .await
            .unwrap(),
        Err(2),
        "the 2 units held leave room for MAX_STOCK - 2 free"
    );
    stock::set_available(&db.pool, "p", MAX_STOCK - 2)
        .await
        .unwrap()
        .unwrap();
    let released = stock::release(&mut conn, "ORD-1").await.unwrap();
    assert!(released.is_some());
    let level = stock::level(&db.pool, "p").await.unwrap().unwrap();
    assert_eq!((level.available, level.reserved), (MAX_STOCK, 0));
}

//! The order cache across replicas: every replica here is an API router of
//! its own with its own cache and listener, over one real database.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use order_cache::{CacheConfig, Listener, OrderCache};
use serde_json::Value;
use testkit::{sample_order, sample_order_with};
use tokio_util::sync::CancellationToken;

use crate::support::{send, Reply};

struct Replica {
    router: Router,
    cache: OrderCache,
}

fn replica(db: &testkit::TestDb, budget_bytes: u64) -> Replica {
    let state = api::AppState::new(store::Store::new(db.pool.clone()), Default::default())
        .with_cache(CacheConfig {
            budget_bytes,
            warmup_limit: Duration::from_secs(30),
        });
    Replica {
        cache: state.cache.clone().unwrap(),
        router: api::router(state),
    }
}

/// A replica whose listener runs as in the API role (and warms it up).
fn running(db: &testkit::TestDb, cancel: &CancellationToken) -> Replica {
    let r = replica(db, 64 << 20);
    let store = store::Store::new(db.pool.clone());
    tokio::spawn(order_cache::listener::run(
        r.cache.clone(),
        store,
        cancel.clone(),
    ));
    r
}

impl Replica {
    async fn get(&self, uri: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        send(&self.router, b.body(Body::empty()).unwrap()).await
    }

    async fn put(&self, id: &str, body: &Value) -> Reply {
        let req = crate::support::json_request(
            axum::http::Method::PUT,
            &format!("/api/v1/orders/{id}"),
            body,
            &[],
        );
        send(&self.router, req).await
    }

    fn cache_lag(&self) -> (u64, f64) {
        self.cache_metrics().lag()
    }

    fn cache_metrics(&self) -> &order_cache::CacheMetrics {
        self.cache.metrics()
    }

    async fn until_ready(&self) {
        let started = Instant::now();
        while self.get("/readyz", &[]).await.status != StatusCode::OK {
            assert!(started.elapsed() < Duration::from_secs(30), "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn hit(r: &Reply) -> bool {
    r.header("cache-status") == Some("orders-center; hit")
}

fn version(r: &Reply) -> i64 {
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["version"].as_i64().unwrap()
}

#[tokio::test]
async fn a_second_replica_sees_a_change_through_the_first_within_the_measured_lag() {
    let db = testkit::database().await;
    let cancel = CancellationToken::new();
    let (a, b) = (running(&db, &cancel), running(&db, &cancel));
    a.until_ready().await;
    b.until_ready().await;
    assert_eq!(
        a.put("R-1", &sample_order("R-1")).await.status,
        StatusCode::CREATED
    );
    // B reads it once from the database, then serves it from its cache.
    let uri = "/api/v1/orders/R-1";
    assert!(!hit(&b.get(uri, &[]).await));
    let cached = b.get(uri, &[]).await;
    assert!(hit(&cached) && version(&cached) == 1);

    let written = Instant::now();
    let (lags_before, _) = b.cache_lag();
    assert_eq!(
        a.put("R-1", &sample_order_with("R-1", "paid", 9.99))
            .await
            .status,
        StatusCode::OK
    );
    let seen = loop {
        let r = b.get(uri, &[]).await;
        if version(&r) == 2 {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "B still serves version 1"
        );
        tokio::task::yield_now().await;
    };
    let (lags, lag_sum) = b.cache_lag();
    assert!(lags > lags_before, "B applied no notification");
    let mean = Duration::from_secs_f64(lag_sum / lags as f64);
    assert!(mean < Duration::from_secs(1), "notification lag {mean:?}");
    assert!(
        seen < Duration::from_secs(1),
        "B saw version 2 after {seen:?}"
    );
    assert_eq!(b.get(uri, &[]).await.json()["order"]["status"], "paid");
    // The writer never serves older than its own write, from its cache.
    let own = a.get(uri, &[]).await;
    assert!(hit(&own) && version(&own) == 2);
    cancel.cancel();
}

#[tokio::test]
async fn after_a_restart_the_first_read_of_a_recent_order_is_a_hit() {
    let db = testkit::database().await;
    let first_run = CancellationToken::new();
    let before = running(&db, &first_run);
    before.until_ready().await;
    for i in 0..50 {
        let id = format!("W-{i}");
        assert_eq!(
            before.put(&id, &sample_order(&id)).await.status,
            StatusCode::CREATED
        );
    }
    before
        .put("W-7", &sample_order_with("W-7", "paid", 1.0))
        .await;
    first_run.cancel();
    drop(before);

    let cancel = CancellationToken::new();
    let after = running(&db, &cancel);
    after.until_ready().await;
    let r = after.get("/api/v1/orders/W-7", &[]).await;
    assert!(hit(&r), "the first read after the restart missed");
    assert_eq!(version(&r), 2);
    assert_eq!(after.cache.usage().0, 50);
    assert_eq!(after.cache_metrics().lookups(), (1, 0));
    cancel.cancel();
}

#[tokio::test]
async fn readiness_waits_for_the_warm_up() {
    let db = testkit::database().await;
    let r = replica(&db, 1 << 20);
    // No listener yet: nothing warmed, not ready, and reads still answer.
    let not_ready = r
        .get("/readyz", &[])
        .await
        .problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(not_ready["detail"].as_str().unwrap().contains("warming"));
    let _listener = Listener::connect(&r.cache, &db.pool).await.unwrap();
    let warm = r
        .cache
        .warm_up(&store::Store::new(db.pool.clone()))
        .await
        .unwrap();
    assert_eq!(warm.orders, 0);
    assert_eq!(r.get("/readyz", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_listener_reconnect_drops_the_cache() {
    let db = testkit::database().await;
    let r = replica(&db, 1 << 20);
    let mut listener = Listener::connect(&r.cache, &db.pool).await.unwrap();
    r.put("L-1", &sample_order("L-1")).await;
    assert!(hit(&r.get("/api/v1/orders/L-1", &[]).await));
    listener.step().await.unwrap(); // its own create
    assert_eq!(r.cache.usage().0, 1);

    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%') t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    assert!(listener.step().await.is_err());
    assert_eq!(r.cache.usage().0, 0, "the cache outlived its listener");
    assert_eq!(r.cache_metrics().resets(), 1);
    // Until it listens again, nothing is served from it or kept in it.
    assert!(!hit(&r.get("/api/v1/orders/L-1", &[]).await));
    assert!(!hit(&r.get("/api/v1/orders/L-1", &[]).await));
    let _again = Listener::connect(&r.cache, &db.pool).await.unwrap();
    assert!(!hit(&r.get("/api/v1/orders/L-1", &[]).await));
    assert!(hit(&r.get("/api/v1/orders/L-1", &[]).await));
}

#[tokio::test]
async fn min_version_and_if_none_match_are_honoured_when_the_notification_is_late() {
    let db = testkit::database().await;
    let (a, b) = (replica(&db, 1 << 20), replica(&db, 1 << 20));
    let _la = Listener::connect(&a.cache, &db.pool).await.unwrap();
    // B listens but applies nothing until the test steps it: late.
    let mut lb = Listener::connect(&b.cache, &db.pool).await.unwrap();
    a.put("M-1", &sample_order("M-1")).await;
    let uri = "/api/v1/orders/M-1";
    b.get(uri, &[]).await;
    a.put("M-1", &sample_order_with("M-1", "paid", 2.5)).await;

    let stale = b.get(uri, &[]).await;
    assert!(
        hit(&stale) && version(&stale) == 1,
        "the notification was not late"
    );
    let asked = b.get(&format!("{uri}?min_version=2"), &[]).await;
    assert!(!hit(&asked) && version(&asked) == 2);
    // The ETag a client saw works the same way, and is a 304 when current.
    let r = b.get(uri, &[("if-none-match", "\"2\"")]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.header("etag"), Some("\"2\""));
    assert!(r.body.is_empty());
    let r = b.get(uri, &[("if-none-match", "\"1\"")]).await;
    assert_eq!(version(&r), 2);
    // The late notifications change nothing now, and bad versions are 400s.
    lb.step().await.unwrap();
    lb.step().await.unwrap();
    assert_eq!(version(&b.get(uri, &[]).await), 2);
    for bad in ["min_version=0", "min_version=x"] {
        b.get(&format!("{uri}?{bad}"), &[])
            .await
            .problem(StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn an_order_whose_1c_delivery_is_in_flight_shows_its_latest_sync_state() {
    let db = testkit::database().await;
    let r = replica(&db, 1 << 20);
    let _l = Listener::connect(&r.cache, &db.pool).await.unwrap();
    r.put("S-1", &sample_order("S-1")).await;
    let uri = "/api/v1/orders/S-1";
    let before = r.get(uri, &[]).await;
    assert!(hit(&before));
    assert_eq!(before.json()["sync"]["state"], "pending");
    // The relay delivers: no new order version, no notification.
    sqlx::query("UPDATE outbox SET state = 'done' WHERE aggregateid = 'S-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let after = r.get(uri, &[]).await;
    assert!(hit(&after));
    assert_eq!(after.json()["sync"]["state"], "done");
    let expected: Value = serde_json::to_value(
        store::Store::new(db.pool.clone())
            .get_order(&domain::OrderId::parse("S-1").unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(after.json(), expected, "a hit differs from the database");
}

#[tokio::test]
async fn the_cache_stays_within_its_budget_under_100_000_orders() {
    let db = testkit::database().await;
    // Written without triggers: the fixture, not what is measured.
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO orders (id, type, status, city, subdivision, price, platform,
                             general_id, order_number, executor, version, updated_at)
         SELECT 'B-' || g, 'delivery', 'new', 'Almaty', 'ALM-01', 10.5, 'web',
                gen_random_uuid(), 'N-' || g, 'courier', 1, now() - g * interval '1 ms'
         FROM generate_series(1, 100000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let budget = 4 << 20;
    let r = replica(&db, budget);
    let _l = Listener::connect(&r.cache, &db.pool).await.unwrap();
    let warm = r
        .cache
        .warm_up(&store::Store::new(db.pool.clone()))
        .await
        .unwrap();
    let (entries, bytes) = r.cache.usage();
    assert!(bytes <= budget, "{bytes} > {budget}");
    assert!(
        bytes > budget / 2,
        "the warm-up filled only {bytes} of {budget}"
    );
    assert!(
        entries < 100_000 && entries as usize == warm.orders,
        "{entries}"
    );
    // The newest orders are the ones warmed.
    assert!(hit(&r.get("/api/v1/orders/B-1", &[]).await));
    // Reading orders the warm-up left out keeps it within the budget.
    for i in (1..=100_000).step_by(50) {
        assert_eq!(
            r.get(&format!("/api/v1/orders/B-{i}"), &[]).await.status,
            StatusCode::OK
        );
    }
    let (_, bytes) = r.cache.usage();
    assert!(bytes <= budget, "{bytes} > {budget} after reads");
}

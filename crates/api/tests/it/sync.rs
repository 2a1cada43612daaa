use axum::body::Body;
use axum::http::{Request, StatusCode};
use testkit::sample_order;

use crate::support::TestApp;

fn post(uri: &str) -> Request<Body> {
    Request::post(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn dead_tasks_are_listed_and_replayed_once() {
    let app = TestApp::new().await;
    app.put_order("D1", &sample_order("D1")).await;
    app.put_order("D2", &sample_order("D2")).await;
    sqlx::query("UPDATE outbox SET state = 'dead', attempts = 12, last_error = '1C answered 400'")
        .execute(&app.db.pool)
        .await
        .unwrap();

    let dead = app.get("/api/v1/sync/tasks?state=dead").await.json();
    let first = dead[0]["id"].as_i64().unwrap();
    let replayed = app
        .send(post(&format!("/api/v1/sync/tasks/{first}/retry")))
        .await;
    let again = app
        .send(post(&format!("/api/v1/sync/tasks/{first}/retry")))
        .await;

    assert_eq!(dead.as_array().unwrap().len(), 2);
    assert_eq!(dead[0]["last_error"], "1C answered 400");
    assert_eq!(replayed.status, StatusCode::OK);
    assert_eq!(
        (
            replayed.json()["state"].clone(),
            replayed.json()["attempts"].clone()
        ),
        ("pending".into(), 0.into())
    );
    again.problem(StatusCode::CONFLICT);
    let still_dead = app
        .get(&format!("/api/v1/sync/tasks?state=dead&after={first}"))
        .await
        .json();
    assert_eq!(still_dead.as_array().unwrap().len(), 1);
    let pending = app.get("/api/v1/sync/tasks?state=pending").await.json();
    assert_eq!(pending[0]["id"], first);
}

/// Versions 1 and 2 both went dead. Replaying version 1 once answered 200
/// and rolled 1C back to it; now it is refused, naming the newer task.
#[tokio::test]
async fn a_dead_older_version_is_not_replayed_over_a_dead_newer_one() {
    let app = TestApp::new().await;
    app.put_order("D", &sample_order("D")).await;
    sqlx::query("UPDATE outbox SET state = 'dead'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    app.put_order("D", &sample_order("D")).await;
    sqlx::query("UPDATE outbox SET state = 'dead' WHERE state = 'pending'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let dead = app.get("/api/v1/sync/tasks?state=dead").await.json();
    let (v1, v2) = (
        dead[0]["id"].as_i64().unwrap(),
        dead[1]["id"].as_i64().unwrap(),
    );

    let refused = app
        .send(post(&format!("/api/v1/sync/tasks/{v1}/retry")))
        .await;
    refused.problem(StatusCode::CONFLICT);
    let detail = refused.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains(&format!("task {v2}")), "{detail}");
    let pending = app.get("/api/v1/sync/tasks?state=pending").await.json();
    assert_eq!(pending.as_array().unwrap().len(), 0);

    // The newest one may be replayed.
    let replayed = app
        .send(post(&format!("/api/v1/sync/tasks/{v2}/retry")))
        .await;
    assert_eq!(replayed.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_task_requests_are_problems() {
    let app = TestApp::new().await;
    app.send(post("/api/v1/sync/tasks/424242/retry"))
        .await
        .problem(StatusCode::NOT_FOUND);
    app.send(post("/api/v1/sync/tasks/abc/retry"))
        .await
        .problem(StatusCode::BAD_REQUEST);
    app.get("/api/v1/sync/tasks?state=lost")
        .await
        .problem(StatusCode::BAD_REQUEST);
    app.get("/api/v1/sync/tasks?limit=0")
        .await
        .problem(StatusCode::BAD_REQUEST);
}

/// The API serves the leader's backlog figures while they are fresh, and
/// counts for itself when no leader refreshed them lately.
#[tokio::test]
async fn sync_stats_prefer_the_leaders_fresh_figures() {
    let app = TestApp::new().await;
    app.put_order("S1", &sample_order("S1")).await;
    sqlx::query(
        "INSERT INTO outbox_backlog (destination, pending, running, dead, oldest_pending_at, refreshed_at)
         VALUES ('onec', 42, 1, 7, now() - interval '90 seconds', now())",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();

    let fresh = app.get("/api/v1/sync/stats").await.json();
    sqlx::query("UPDATE outbox_backlog SET refreshed_at = now() - interval '5 minutes'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let stale = app.get("/api/v1/sync/stats").await.json();

    assert_eq!(
        (fresh["pending"].as_i64(), fresh["dead"].as_i64()),
        (Some(42), Some(7))
    );
    assert!(fresh["oldest_pending_age_seconds"].as_f64().unwrap() >= 90.0);
    assert_eq!(
        (stale["pending"].as_i64(), stale["dead"].as_i64()),
        (Some(1), Some(0))
    );
}

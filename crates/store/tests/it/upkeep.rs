//! The leader's upkeep statements stay cheap as finished rows pile up.

use domain::Destination;
use store::Store;

/// The backlog recount runs every few seconds on the leader; its cost must
/// follow the open rows, not the finished ones kept for retention.
#[tokio::test]
async fn the_backlog_recount_reads_open_rows_only() {
    let db = testkit::database().await;
    sqlx::query(
        "INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version,
                             payload, state, attempts, finished_at, created_at)
         SELECT gen_random_uuid(), 'events', 'order', 'K-' || g, 'order.updated', 1, '{}',
                CASE WHEN g < 100 THEN 'pending' WHEN g < 110 THEN 'dead' ELSE 'done' END,
                1, CASE WHEN g >= 100 THEN now() END, now() - make_interval(secs => 20000 - g)
         FROM generate_series(0, 19999) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox")
        .execute(&db.pool)
        .await
        .unwrap();

    let plan: crate::Plan = sqlx::query_scalar(&crate::explained(store::LIVE_COUNTS))
        .bind(vec!["events"])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let read = crate::rows_read(&plan);
    assert!(
        read <= 2.0 * 110.0,
        "the recount of 110 open rows read {read} rows: {plan:#?}"
    );

    let events: Destination = "events".parse().unwrap();
    let stats = Store::new(db.pool.clone())
        .refresh_backlog(std::slice::from_ref(&events))
        .await
        .unwrap()
        .destinations;
    assert_eq!(
        (stats[0].pending, stats[0].running, stats[0].dead),
        (100, 0, 10)
    );
    assert!(
        (19_999.0..20_100.0).contains(&stats[0].oldest_pending_age_seconds),
        "the oldest pending message is 20,000 s old: {}",
        stats[0].oldest_pending_age_seconds
    );
}

/// The inbox keeps a row per message (issue 33, decision 4: no transport
/// here carries a per-key sequence that a high-water mark could stand on),
/// so its size is bounded by age: rows older than the window go, a batch at
/// a time, and the window's rows stay to absorb redeliveries.
#[tokio::test]
async fn inbox_rows_older_than_the_window_are_deleted_a_batch_at_a_time() {
    let db = testkit::database().await;
    sqlx::query(
        "INSERT INTO inbox (consumer, message_id, received_at)
         SELECT 'saga', 'm-' || g, now() - make_interval(hours => CASE WHEN g < 300 THEN 25 ELSE 1 END)
         FROM generate_series(0, 399) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let store = Store::new(db.pool.clone());
    let day = std::time::Duration::from_secs(86_400);
    let count = |old: bool| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM inbox WHERE (received_at < now() - interval '1 day') = $1",
            )
            .bind(old)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    store.delete_finished(day, day, day, 200).await.unwrap();
    assert_eq!(count(true).await, 100, "one call deletes at most its limit");
    store.delete_finished(day, day, day, 200).await.unwrap();
    assert_eq!(count(true).await, 0);
    assert_eq!(count(false).await, 100, "the window's rows stay");
}

/// Each relay reports its breakers; the leader reads the fresh ones, and a
/// relay gone an hour leaves no row behind.
#[tokio::test]
async fn relay_breakers_are_read_while_fresh_and_deleted_when_gone() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    store
        .report_breakers("relay-0", &[("onec", "Closed"), ("kafka", "Open")])
        .await
        .unwrap();
    store
        .report_breakers("relay-1", &[("onec", "Closed")])
        .await
        .unwrap();
    store
        .report_breakers("relay-1", &[("onec", "HalfOpen")])
        .await
        .unwrap();
    let fresh = std::time::Duration::from_secs(15);
    let all = |v: &[(&str, &str, &str)]| {
        v.iter()
            .map(|(d, r, s)| ((*d).to_owned(), (*r).to_owned(), (*s).to_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        store.breakers(fresh).await.unwrap(),
        all(&[
            ("kafka", "relay-0", "Open"),
            ("onec", "relay-0", "Closed"),
            ("onec", "relay-1", "HalfOpen"),
        ])
    );
    backdate(&db.pool, Some("relay-1"), "1 minute").await;
    assert_eq!(
        store.breakers(fresh).await.unwrap().len(),
        2,
        "a stale report is ignored"
    );
    backdate(&db.pool, Some("relay-1"), "2 hours").await;
    store
        .report_breakers("relay-0", &[("onec", "Closed")])
        .await
        .unwrap();
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay_breakers WHERE relay_id = 'relay-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0, "the next report deletes a relay gone an hour");
    // A relay back after an hour reports over its own old rows.
    backdate(&db.pool, None, "2 hours").await;
    store
        .report_breakers("relay-0", &[("onec", "Open")])
        .await
        .unwrap();
    assert_eq!(
        store.breakers(fresh).await.unwrap(),
        all(&[("onec", "relay-0", "Open")])
    );
}

/// Makes the reports of `relay` (of every relay: `None`) look `by` older.
async fn backdate(pool: &sqlx::PgPool, relay: Option<&str>, by: &str) {
    sqlx::query(
        "UPDATE relay_breakers SET seen_at = now() - $2::interval
         WHERE $1::text IS NULL OR relay_id = $1",
    )
    .bind(relay)
    .bind(by)
    .execute(pool)
    .await
    .unwrap();
}

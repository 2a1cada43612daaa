//! The upgrade from the 1C-only task table to the general outbox, on a
//! database filled through the old schema.

use std::borrow::Cow;

use domain::{DeliveryPolicy, Destination, TaskState};
use sqlx::migrate::Migrator;
use store::{ClaimSpec, Store, TaskId};

/// The first migration of the general outbox.
const GENERAL_OUTBOX: i64 = 20261124000007;

#[tokio::test]
async fn the_upgrade_keeps_every_pending_running_and_dead_task() {
    let db = testkit::unmigrated_database().await;
    let before = Migrator {
        migrations: Cow::Owned(
            store::MIGRATOR
                .iter()
                .filter(|m| m.version < GENERAL_OUTBOX)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    before.run(&db.pool).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO onec_tasks (order_id, order_version, snapshot)
         SELECT 'P-' || g, 1, jsonb_build_object('v', g) FROM generate_series(1, 50) g;
         INSERT INTO onec_tasks (order_id, order_version, snapshot) VALUES ('P-1', 2, '{\"v\": 2}');
         INSERT INTO onec_tasks (order_id, order_version, snapshot, state, attempts, last_error,
                                 finished_at, in_doubt_until)
         SELECT 'D-' || g, 3, '{}', 'dead', 12, '1C answered 400', now(), now() + interval '1 minute'
         FROM generate_series(1, 20) g;
         INSERT INTO onec_tasks (order_id, order_version, snapshot, state, attempts, claimed_by,
                                 claim_token, claim_expires_at)
         VALUES ('R-1', 1, '{}', 'running', 1, 'old-relay', gen_random_uuid(), now() + interval '1 minute');
         INSERT INTO onec_tasks (order_id, order_version, snapshot, state, finished_at)
         VALUES ('F-1', 1, '{}', 'done', now());
         INSERT INTO onec_backlog (pending, running, dead, refreshed_at) VALUES (51, 1, 20, now());",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let old_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM onec_tasks ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();

    store::migrate(&db.pool).await.unwrap();

    let moved: Vec<(i64, String, String, String, String, i64)> = sqlx::query_as(
        "SELECT id, destination, aggregatetype, aggregateid, type, version FROM outbox ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        moved.iter().map(|m| m.0).collect::<Vec<_>>(),
        old_ids,
        "every task kept its id"
    );
    assert!(moved.iter().all(|m| m.1 == "onec" && m.2 == "order"));
    let type_of = |key: &str, version: i64| {
        moved
            .iter()
            .find(|m| m.3 == key && m.5 == version)
            .map(|m| m.4.clone())
    };
    assert_eq!(type_of("P-1", 1).as_deref(), Some("order.created"));
    assert_eq!(type_of("P-1", 2).as_deref(), Some("order.updated"));
    let distinct_event_ids: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(distinct_event_ids, moved.len() as i64);

    let store = Store::new(db.pool.clone());
    let onec = Destination::onec();
    let dead = store
        .list_tasks(Some(&onec), TaskState::Dead, None, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), 20);
    assert!(dead
        .iter()
        .all(|t| t.attempts == 12 && t.last_error.as_deref() == Some("1C answered 400")));
    let stats = store.sync_stats(&onec).await.unwrap();
    assert_eq!((stats.pending, stats.running, stats.dead), (51, 1, 20));

    // The moved rows are delivered as before: the newest version of each
    // order, the older one superseded, the held claim left alone.
    let claim = store
        .claim_batch(&ClaimSpec {
            destination: &onec,
            policy: DeliveryPolicy::LatestWins,
            claimant: "new-relay",
            limit: 100,
            lease: std::time::Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert_eq!(claim.tasks.len(), 50);
    assert_eq!(claim.superseded, 1);
    let p1 = claim
        .tasks
        .iter()
        .find(|t| t.aggregate_id == "P-1")
        .unwrap();
    assert_eq!(
        (p1.version, p1.payload_json().unwrap()["v"].as_i64()),
        (2, Some(2))
    );
    assert!(!claim.tasks.iter().any(|t| t.aggregate_id == "R-1"));
    // And a dead one replays.
    let replayed = store.retry_task(TaskId(dead[0].id)).await.unwrap();
    assert_eq!(replayed.state, TaskState::Pending);
}

/// The migration that moves event streams onto the log.
const ONTO_THE_LOG: i64 = 20261205000016;

#[tokio::test]
async fn event_stream_rows_move_onto_the_log_in_order_and_dead_ones_keep_their_ids() {
    let db = testkit::unmigrated_database().await;
    let before = Migrator {
        migrations: Cow::Owned(
            store::MIGRATOR
                .iter()
                .filter(|m| m.version < ONTO_THE_LOG)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    before.run(&db.pool).await.unwrap();
    // Two keys with three versions each, interleaved; a running row, a dead
    // one, a done one; and 1C's rows, which stay.
    sqlx::raw_sql(
        "INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version, payload)
         SELECT gen_random_uuid(), 'kafka', 'order', 'K-' || (g % 2), 'order.updated', g, jsonb_build_object('v', g)
         FROM generate_series(1, 6) g;
         INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version, payload,
                             state, attempts, claimed_by, claim_token, claim_expires_at)
         VALUES (gen_random_uuid(), 'rabbitmq', 'saga.commands', 'S-1', 'ReserveStock', 1, '{}',
                 'running', 1, 'old-relay', gen_random_uuid(), now() + interval '1 minute');
         INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version, payload,
                             state, attempts, last_error, finished_at)
         VALUES (gen_random_uuid(), 'kafka', 'order', 'D-1', 'order.created', 1, '{\"big\": true}',
                 'dead', 3, 'message too large', now());
         INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version, payload,
                             state, finished_at)
         VALUES (gen_random_uuid(), 'kafka', 'order', 'F-1', 'order.created', 1, '{}', 'done', now());
         INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version, payload)
         VALUES (gen_random_uuid(), 'onec', 'order', 'O-1', 'order.created', 1, '{}'),
                (gen_random_uuid(), 'onec', 'order', 'O-1', 'order.updated', 2, '{}');",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let dead_id: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE state = 'dead'")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    store::migrate(&db.pool).await.unwrap();

    let left: Vec<(String, String)> =
        sqlx::query_as("SELECT destination, state FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        left,
        [("kafka", "done"), ("onec", "pending"), ("onec", "pending")]
            .map(|(d, s)| (d.to_owned(), s.to_owned())),
        "only 1C's rows and finished ones stay in the outbox"
    );
    let logged: Vec<(String, i16, String, i64)> = sqlx::query_as(
        "SELECT destination, partition, aggregateid, version FROM event_log ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(logged.len(), 7);
    for key in ["K-0", "K-1"] {
        let versions: Vec<i64> = logged.iter().filter(|e| e.2 == key).map(|e| e.3).collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{key}: {versions:?}"
        );
        let partition = store::log::partition_of(16, "order", key);
        assert!(logged
            .iter()
            .filter(|e| e.2 == key)
            .all(|e| e.1 == partition));
    }

    // The log's engine reads them; the dead one is listed and replayed
    // under its old id.
    let store = Store::new(db.pool.clone());
    let kafka: Destination = "kafka".parse().unwrap();
    let dead = store
        .list_tasks(Some(&kafka), TaskState::Dead, None, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].last_error.as_deref()),
        (dead_id, Some("outbox: message too large"))
    );
    let stats = store.sync_stats(&kafka).await.unwrap();
    assert_eq!((stats.pending, stats.dead), (6, 1));
    let replayed = store.retry_task(TaskId(dead_id)).await.unwrap();
    assert_eq!(
        (replayed.state, replayed.order_id.as_str()),
        (TaskState::Pending, "D-1")
    );
    let stats = store.sync_stats(&kafka).await.unwrap();
    assert_eq!((stats.pending, stats.dead), (7, 0));
}

//! The event-stream log on real PostgreSQL: the commit-order fence, runs
//! that resume where the last claim stopped, claims that skip held
//! partitions and free a dead relay's at once, and rotation that truncates
//! only what every cursor has passed.

use domain::Destination;
use sqlx::{Connection, PgConnection, PgPool};
use store::log::{append, Append};
use store::Store;
use uuid::Uuid;

fn events() -> Destination {
    "kafka".parse().unwrap()
}

/// One partition and segments of `segment_size` positions, so a test
/// decides where its events land.
async fn shaped(pool: &PgPool, segment_size: i64) -> Store {
    sqlx::query("UPDATE log_config SET partitions = 1, segment_size = $1")
        .bind(segment_size)
        .execute(pool)
        .await
        .unwrap();
    let store = Store::new(pool.clone());
    store.ensure_cursors(&events()).await.unwrap();
    let shape = store.log_shape().await.unwrap();
    assert_eq!((shape.partitions, shape.segment_size), (1, segment_size));
    store
}

async fn put(conn: &mut PgConnection, destination: &Destination, keys: &[&str]) {
    let payload = serde_json::json!({"in": "test"});
    let batch: Vec<_> = keys
        .iter()
        .map(|key| Append {
            destination,
            stream: "order",
            key,
            kind: "order.updated",
            version: 1,
            event_id: Uuid::now_v7(),
            payload: &payload,
            traceparent: None,
        })
        .collect();
    append(conn, &batch).await.unwrap();
}

/// Reads the partition through in runs of `limit`, claiming afresh for
/// each run as a relay does, and returns the keys in the order delivered.
async fn drain(store: &Store, limit: u32) -> Vec<String> {
    let mut keys = Vec::new();
    loop {
        let mut claim = store
            .claim_partition(&events(), "r1", &[])
            .await
            .unwrap()
            .unwrap();
        let run = claim.read(limit).await.unwrap();
        keys.extend(run.events.iter().map(|e| e.key.clone()));
        claim.advance().await.unwrap();
        if run.complete {
            return keys;
        }
    }
}

#[tokio::test]
async fn an_event_whose_transaction_took_its_position_first_and_commits_last_is_not_skipped() {
    let db = testkit::database().await;
    let store = shaped(&db.pool, 1_000_000).await;
    let url = db.url.clone();
    let mut first = PgConnection::connect(&url).await.unwrap();
    let mut second = PgConnection::connect(&url).await.unwrap();

    // `first` draws position 1 and stays open; `second` draws 2 and commits.
    let mut slow = first.begin().await.unwrap();
    put(&mut slow, &events(), &["K-slow"]).await;
    let mut quick = second.begin().await.unwrap();
    put(&mut quick, &events(), &["K-quick"]).await;
    quick.commit().await.unwrap();

    assert_eq!(
        drain(&store, 10).await,
        ["K-quick"],
        "only what has committed"
    );
    slow.commit().await.unwrap();
    assert_eq!(
        drain(&store, 10).await,
        ["K-slow"],
        "the lower position, committed later, comes in the next window"
    );
    assert!(drain(&store, 10).await.is_empty(), "each once");
}

#[tokio::test]
async fn runs_resume_where_the_last_claim_stopped_and_a_released_run_is_read_again() {
    let db = testkit::database().await;
    let store = shaped(&db.pool, 1_000_000).await;
    let keys: Vec<String> = (0..25).map(|i| format!("K-{i:02}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    put(&mut db.pool.acquire().await.unwrap(), &events(), &refs).await;

    let mut claim = store
        .claim_partition(&events(), "r1", &[])
        .await
        .unwrap()
        .unwrap();
    let first = claim.read(10).await.unwrap();
    claim.release().await.unwrap();
    let mut claim = store
        .claim_partition(&events(), "r2", &[])
        .await
        .unwrap()
        .unwrap();
    let again = claim.read(10).await.unwrap();
    assert_eq!(
        first.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        again.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        "a released run comes again"
    );
    assert!(!again.complete);
    claim.advance().await.unwrap();

    let rest = drain(&store, 10).await;
    assert_eq!(
        rest,
        &keys[10..],
        "the rest, in order, after the advanced run"
    );
}

#[tokio::test]
async fn a_held_partition_is_skipped_and_a_dead_holders_is_free_at_once() {
    let db = testkit::database().await;
    let store = shaped(&db.pool, 1_000_000).await;
    let held = store
        .claim_partition(&events(), "r1", &[])
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .claim_partition(&events(), "r2", &[])
            .await
            .unwrap()
            .is_none(),
        "the only partition is held"
    );
    // The holder dies: its backend goes, and the lock with it.
    let pid: i32 = sqlx::query_scalar(
        "SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
         JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE c.relname = 'log_cursors' AND l.mode = 'RowShareLock'
           AND a.state = 'idle in transaction' AND a.datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&db.pool)
        .await
        .unwrap();
    let taken = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            if let Some(c) = store.claim_partition(&events(), "r2", &[]).await.unwrap() {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("taken over within 5 s");
    assert_eq!(taken.partition(), 0);
    drop(held);
}

#[tokio::test]
async fn the_lag_counts_what_no_cursor_has_passed_and_nothing_it_has() {
    let db = testkit::database().await;
    let store = shaped(&db.pool, 1_000_000).await;
    let keys: Vec<String> = (0..10).map(|i| format!("K-{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    put(&mut db.pool.acquire().await.unwrap(), &events(), &refs).await;
    let lag = |store: Store| async move { store.cursor_lag(&[events()]).await.unwrap() };
    let before = lag(store.clone()).await;
    assert_eq!(before.len(), 1, "one partition");
    assert_eq!(
        (before[0].destination.as_str(), before[0].events),
        ("kafka", 10)
    );
    assert!(before[0].oldest_at.is_some());

    // Four delivered, the window still open after them.
    let mut claim = store
        .claim_partition(&events(), "r1", &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.read(4).await.unwrap().events.len(), 4);
    claim.advance().await.unwrap();
    assert_eq!(lag(store.clone()).await[0].events, 6);

    drain(&store, 100).await;
    let after = lag(store.clone()).await;
    assert_eq!((after[0].events, after[0].oldest_at), (0, None));
    assert_eq!(after[0].owner.as_deref(), Some("r1"));
    assert!(after[0].delivered_at.is_some());
}

#[tokio::test]
async fn rotation_truncates_only_segments_every_cursor_has_passed() {
    let db = testkit::database().await;
    let store = shaped(&db.pool, 10).await;
    let other: Destination = "rabbitmq".parse().unwrap();
    store.ensure_cursors(&other).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let keys: Vec<String> = (1..=25).map(|i| format!("K-{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    // Positions 1-25 for kafka: segments 0 (1-9), 1 (10-19) and 2 (20-25,
    // where the sequence writes now); then 26-28 for rabbitmq, in segment 2.
    put(&mut conn, &events(), &refs).await;
    put(&mut conn, &other, &["R-1", "R-2", "R-3"]).await;
    let counts = |pool: PgPool| async move {
        let mut v = Vec::new();
        for s in 0..4 {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM event_log_{s}"))
                .fetch_one(&pool)
                .await
                .unwrap();
            v.push(n);
        }
        v
    };
    assert_eq!(counts(db.pool.clone()).await, [9, 10, 9, 0]);

    assert!(
        store.rotate_log().await.unwrap().is_empty(),
        "nothing delivered yet"
    );
    // Half of kafka's window: a window is passed only when it is through.
    let mut claim = store
        .claim_partition(&events(), "r1", &[])
        .await
        .unwrap()
        .unwrap();
    claim.read(15).await.unwrap();
    claim.advance().await.unwrap();
    assert!(
        store.rotate_log().await.unwrap().is_empty(),
        "kafka is midway"
    );

    assert_eq!(drain(&store, 100).await.len(), 10);
    assert_eq!(store.rotate_log().await.unwrap(), [0, 1]);
    assert_eq!(
        counts(db.pool.clone()).await,
        [0, 0, 9, 0],
        "segment 2 is written into"
    );

    // The log's rows are never updated or deleted: nothing dead, no vacuum.
    let dead: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(n_dead_tup + n_tup_upd + n_tup_del), 0)::int8
         FROM pg_stat_user_tables WHERE relname LIKE 'event_log_%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(dead, 0);
}

#[tokio::test]
async fn the_migrations_hash_is_the_relays_hash() {
    let db = testkit::database().await;
    let keys = [
        "",
        "A-1",
        "ORD-2026-000042",
        "заказ-7",
        "k\u{1F600}",
        &"x".repeat(300),
    ];
    for stream in ["order", "saga.commands"] {
        for key in keys {
            let in_sql: i64 = sqlx::query_scalar("SELECT log_key_hash($1, $2)")
                .bind(stream)
                .bind(key)
                .fetch_one(&db.pool)
                .await
                .unwrap();
            assert_eq!(in_sql, store::log::key_hash(stream, key), "{stream} {key}");
        }
    }
}

//! The "every message in order" policy: nothing superseded, one key's
//! messages strictly in write order, keys independent of each other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use domain::{DeliveryPolicy, Destination};
use sqlx::PgPool;
use store::{ClaimSpec, ClaimedTask, Store};

static EVENTS: LazyLock<Destination> = LazyLock::new(|| "events".parse().unwrap());

fn spec(claimant: &str, limit: u32) -> ClaimSpec<'_> {
    ClaimSpec {
        destination: &EVENTS,
        policy: DeliveryPolicy::EveryMessageInOrder,
        claimant,
        limit,
        lease: Duration::from_secs(60),
    }
}

/// Queues `per_key` messages on each of `keys` keys, interleaved across
/// keys, each carrying its place in its key as `seq`.
async fn queue(pool: &PgPool, keys: i64, per_key: i64) {
    sqlx::query(
        "INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version,
                             payload)
         SELECT gen_random_uuid(), 'events', 'order', 'K-' || (g % $1), 'order.updated',
                g / $1 + 1, jsonb_build_object('seq', g / $1 + 1)
         FROM generate_series(0, $1 * $2 - 1) g",
    )
    .bind(keys)
    .bind(per_key)
    .execute(pool)
    .await
    .unwrap();
}

async fn claim(store: &Store) -> Vec<ClaimedTask> {
    let claim = store.claim_batch(&spec("r", 100)).await.unwrap();
    assert_eq!(claim.superseded, 0, "nothing is superseded in order");
    claim.tasks
}

fn seqs(tasks: &[ClaimedTask]) -> Vec<(String, i64)> {
    let mut v: Vec<_> = tasks
        .iter()
        .map(|t| {
            (
                t.aggregate_id.clone(),
                t.payload_json().unwrap()["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn eight_claimers_deliver_10000_messages_on_500_keys_once_each_and_in_key_order() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    queue(&db.pool, 500, 20).await;
    let in_flight = Arc::new(Mutex::new(HashSet::new()));
    let delivered: Arc<Mutex<HashMap<String, Vec<i64>>>> = Arc::default();

    let claimers: Vec<_> = (0..8)
        .map(|i| {
            let (store, in_flight, delivered) =
                (store.clone(), in_flight.clone(), delivered.clone());
            tokio::spawn(async move {
                let name = format!("r{i}");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "drain took over 60 s"
                    );
                    let claim = store.claim_batch(&spec(&name, 50)).await.unwrap();
                    assert_eq!(claim.superseded, 0);
                    // A key comes as one run, and no other claimer holds it.
                    let mut runs: HashMap<String, Vec<i64>> = HashMap::new();
                    for t in &claim.tasks {
                        runs.entry(t.aggregate_id.clone())
                            .or_default()
                            .push(t.payload_json().unwrap()["seq"].as_i64().unwrap());
                    }
                    for (key, seqs) in &mut runs {
                        assert!(
                            in_flight.lock().unwrap().insert(key.clone()),
                            "{key} is claimed twice at once"
                        );
                        seqs.sort_unstable();
                        assert!(
                            seqs.windows(2).all(|w| w[1] == w[0] + 1),
                            "{key} came with a gap: {seqs:?}"
                        );
                    }
                    for (key, seqs) in runs {
                        delivered
                            .lock()
                            .unwrap()
                            .entry(key.clone())
                            .or_default()
                            .extend(seqs);
                        in_flight.lock().unwrap().remove(&key);
                    }
                    let claims: Vec<_> = claim.tasks.iter().map(|t| (t.id, t.token)).collect();
                    assert_eq!(
                        store.complete_many(&claims).await.unwrap(),
                        claims.len() as u64
                    );
                    if claim.tasks.is_empty() {
                        let open: i64 = sqlx::query_scalar(
                            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'running')",
                        )
                        .fetch_one(store.pool())
                        .await
                        .unwrap();
                        if open == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    for c in claimers {
        c.await.unwrap();
    }

    let delivered = std::mem::take(&mut *delivered.lock().unwrap());
    assert_eq!(delivered.len(), 500);
    let expected: Vec<i64> = (1..=20).collect();
    for (key, seqs) in &delivered {
        assert_eq!(seqs, &expected, "{key} was delivered out of order or twice");
    }
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state = 'done'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(done, 10_000);
}

#[tokio::test]
async fn a_failing_key_waits_alone_and_resumes_at_its_failed_message() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    queue(&db.pool, 2, 3).await;

    let first = claim(&store).await;
    assert_eq!(
        seqs(&first),
        [
            ("K-0".into(), 1),
            ("K-0".into(), 2),
            ("K-0".into(), 3),
            ("K-1".into(), 1),
            ("K-1".into(), 2),
            ("K-1".into(), 3)
        ],
        "each key comes as one run, in order"
    );
    // K-0's first message fails; the rest of its run goes back untried.
    let mut k0: Vec<_> = first.iter().filter(|t| t.aggregate_id == "K-0").collect();
    k0.sort_by_key(|t| t.id);
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert!(store
        .retry_later(k0[0].id, k0[0].token, later, "broker said no", None)
        .await
        .unwrap());
    for t in &k0[1..] {
        assert!(store.release(t.id, t.token).await.unwrap());
    }
    let k1: Vec<_> = first
        .iter()
        .filter(|t| t.aggregate_id == "K-1")
        .map(|t| (t.id, t.token))
        .collect();
    assert_eq!(store.complete_many(&k1).await.unwrap(), 3);

    // Nothing of K-0 overtakes its failed first message, and the messages
    // behind it wait as long as it does, out of the candidate pages.
    assert!(claim(&store).await.is_empty());
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE aggregateid = 'K-0' AND state = 'pending'
           AND run_at >= $1",
    )
    .bind(later)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(parked, 3);

    // When it is due again, it goes first, the rest right behind it.
    sqlx::query("UPDATE outbox SET run_at = now() WHERE id = $1")
        .bind(k0[0].id.0)
        .execute(&db.pool)
        .await
        .unwrap();
    let again = claim(&store).await;
    assert_eq!(
        seqs(&again),
        [("K-0".into(), 1), ("K-0".into(), 2), ("K-0".into(), 3)]
    );
    let attempts: Vec<i32> = {
        let mut a: Vec<_> = again.iter().map(|t| (t.id, t.attempts)).collect();
        a.sort();
        a.into_iter().map(|(_, n)| n).collect()
    };
    assert_eq!(attempts, [2, 1, 1], "released messages were refunded");
}

async fn states(pool: &PgPool, key: &str) -> Vec<(String, i32)> {
    sqlx::query_as("SELECT state, attempts FROM outbox WHERE aggregateid = $1 ORDER BY id")
        .bind(key)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn state(s: &str, attempts: i32) -> (String, i32) {
    (s.to_owned(), attempts)
}

#[tokio::test]
async fn a_run_is_held_through_its_head_and_written_once_per_message() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    queue(&db.pool, 1, 4).await;

    let run = claim(&store).await;

    assert_eq!(run.len(), 4);
    assert_eq!(run.iter().filter(|t| !t.token.via_head).count(), 1);
    assert!(run.iter().all(|t| t.attempts == 1));
    assert_eq!(
        states(&db.pool, "K-0").await,
        [
            state("running", 1),
            state("pending", 0),
            state("pending", 0),
            state("pending", 0)
        ],
        "only the head is written"
    );
    let other = store.claim_batch(&spec("other", 100)).await.unwrap();
    assert!(
        other.tasks.is_empty(),
        "the running head holds its whole run"
    );

    let claims: Vec<_> = run.iter().map(|t| (t.id, t.token)).collect();
    assert_eq!(store.complete_many(&claims).await.unwrap(), 4);
    assert_eq!(states(&db.pool, "K-0").await, vec![state("done", 1); 4]);
}

#[tokio::test]
async fn a_tail_is_fenced_by_its_head_claim() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    queue(&db.pool, 1, 3).await;
    let mut run = claim(&store).await;
    run.sort_by_key(|t| t.id);
    // The head's claim expires and is rescued: the old run's outcomes are void.
    sqlx::query("UPDATE outbox SET claim_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(run[0].id.0)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(store.rescue_expired(10).await.unwrap(), [run[0].id]);

    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert!(!store
        .retry_later(run[1].id, run[1].token, later, "late", None)
        .await
        .unwrap());
    assert!(!store
        .mark_dead(run[2].id, run[2].token, "late", None)
        .await
        .unwrap());
    let tails: Vec<_> = run[1..].iter().map(|t| (t.id, t.token)).collect();
    assert_eq!(store.complete_many(&tails).await.unwrap(), 0);
    assert_eq!(
        states(&db.pool, "K-0").await,
        [
            state("pending", 1),
            state("pending", 0),
            state("pending", 0)
        ]
    );

    // The new claimant's run goes through.
    let again = claim(&store).await;
    let claims: Vec<_> = again.iter().map(|t| (t.id, t.token)).collect();
    assert_eq!(store.complete_many(&claims).await.unwrap(), 3);
}

#[tokio::test]
async fn a_tail_that_fails_behind_a_delivered_head_keeps_its_backoff() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    queue(&db.pool, 1, 3).await;
    let mut run = claim(&store).await;
    run.sort_by_key(|t| t.id);
    let later = chrono::Utc::now() + chrono::Duration::hours(1);

    // The head went, the second failed, the third was not tried.
    assert!(store
        .retry_later(run[1].id, run[1].token, later, "broker said no", None)
        .await
        .unwrap());
    assert!(store.release(run[2].id, run[2].token).await.unwrap());
    assert_eq!(
        store
            .complete_many(&[(run[0].id, run[0].token)])
            .await
            .unwrap(),
        1
    );

    assert_eq!(
        states(&db.pool, "K-0").await,
        [state("done", 1), state("pending", 1), state("pending", 0)]
    );
    let run_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT run_at FROM outbox WHERE id = $1")
            .bind(run[1].id.0)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // PostgreSQL keeps microseconds.
    assert!(
        run_at > later - chrono::Duration::milliseconds(1),
        "the head's completion must not undo the backoff"
    );
    assert!(
        claim(&store).await.is_empty(),
        "the third waits behind the second"
    );
}

#[tokio::test]
async fn a_dead_message_is_skipped_and_cannot_be_replayed_after_newer_ones() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    queue(&db.pool, 1, 2).await;
    let mut run = claim(&store).await;
    run.sort_by_key(|t| t.id);
    let (first, second) = (&run[0], &run[1]);
    assert!(store
        .mark_dead(first.id, first.token, "message too large", None)
        .await
        .unwrap());
    assert!(store.release(second.id, second.token).await.unwrap());
    let second = claim(&store).await.remove(0);
    assert_eq!(second.payload_json().unwrap()["seq"], 2);
    assert!(store.complete(second.id, second.token).await.unwrap());

    let refused = store.retry_task(first.id).await.unwrap_err();
    assert!(
        refused.to_string().contains("was queued after it"),
        "{refused}"
    );
}

/// Statistics taken before a burst say the table is small and nothing is
/// pending. Claims and completions must still read only their own keys'
/// rows: a completion once reached them through the pending index and read
/// every pending row of the destination per completed message (12 ms each
/// during the saga benchmark), and a claim parked a busy key's run through
/// a scan of the whole table.
#[tokio::test]
async fn claims_and_completions_read_only_their_keys_when_statistics_predate_a_burst() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    let exec = |sql: &'static str| sqlx::query(sql).execute(&db.pool);
    // No analyze may refresh the statistics mid-test.
    exec("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    // Analysed while a few other keys had many messages, all delivered: a
    // key looks long and nothing looks pending.
    exec(
        "INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version,
                             payload, state, attempts, finished_at)
         SELECT gen_random_uuid(), 'events', 'order', 'H-' || (g % 20), 'order.updated',
                g / 20 + 1, '{}', 'done', 1, now()
         FROM generate_series(0, 9999) g",
    )
    .await
    .unwrap();
    exec("ANALYZE outbox").await.unwrap();
    queue(&db.pool, 4_000, 5).await;

    let claim = store.claim_batch(&spec("r", 5)).await.unwrap();
    let (tails, heads): (Vec<_>, Vec<_>) = claim.tasks.iter().partition(|t| t.token.via_head);
    assert!(!heads.is_empty() && !tails.is_empty(), "runs were claimed");
    let ids: Vec<i64> = heads.iter().map(|t| t.id.0).collect();
    let tokens: Vec<uuid::Uuid> = heads.iter().map(|t| t.token.uuid).collect();
    let tail_ids: Vec<i64> = tails.iter().map(|t| t.id.0).collect();

    // A claim handed these keys finds them busy and parks their runs.
    let keys: Vec<&str> = heads.iter().map(|t| t.aggregate_id.as_str()).collect();
    let mut tx = db.pool.begin().await.unwrap();
    let plan: crate::Plan = sqlx::query_scalar(&crate::explained(store::claim_sql::claim(
        DeliveryPolicy::EveryMessageInOrder,
    )))
    .bind(&keys)
    .bind("other")
    .bind(60.0)
    .bind("events")
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let read = crate::rows_read(&plan);
    assert!(
        read < 20.0 * claim.tasks.len() as f64,
        "the claim of {} busy keys read {read} outbox rows: {plan:#?}",
        keys.len(),
    );
    tx.rollback().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let plan: crate::Plan =
        sqlx::query_scalar(&crate::explained(store::claim_sql::COMPLETE.as_str()))
            .bind(&ids)
            .bind(&tokens)
            .bind(&tail_ids)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let read = crate::rows_read(&plan);
    // Each completed message reads the few rows of its own key; the pending
    // rows of the destination are 20,000.
    assert!(
        read < 20.0 * claim.tasks.len() as f64,
        "the completion of {} messages read {read} outbox rows: {plan:#?}",
        claim.tasks.len(),
    );
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE state = 'done' AND id = ANY($1 || $2)",
    )
    .bind(&ids)
    .bind(&tail_ids)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(done as usize, claim.tasks.len(), "heads and tails are done");
}

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use domain::{DeliveryPolicy, Destination, TaskState};
use sqlx::PgPool;
use store::{ClaimSpec, ClaimedTask, Store, TaskId};

static ONEC: LazyLock<Destination> = LazyLock::new(Destination::onec);

fn spec(claimant: &str, limit: u32) -> ClaimSpec<'_> {
    ClaimSpec {
        destination: &ONEC,
        policy: DeliveryPolicy::LatestWins,
        claimant,
        limit,
        lease: Duration::from_secs(60),
    }
}

async fn insert_task(pool: &PgPool, order: &str, version: i64) -> TaskId {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload)
         VALUES (gen_random_uuid(), 'onec', 'order', 'order.updated', $1, $2, jsonb_build_object('v', $2)) RETURNING id",
    )
    .bind(order)
    .bind(version)
    .fetch_one(pool)
    .await
    .unwrap();
    TaskId(id)
}

/// Claims up to `limit` tasks as relay "r".
async fn claim(store: &Store, limit: u32) -> Vec<ClaimedTask> {
    store.claim_batch(&spec("r", limit)).await.unwrap().tasks
}

async fn state_of(pool: &PgPool, id: TaskId) -> String {
    sqlx::query_scalar("SELECT state FROM outbox WHERE id = $1")
        .bind(id.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn versions(claimed: &[ClaimedTask]) -> Vec<(String, i64)> {
    let mut v: Vec<_> = claimed
        .iter()
        .map(|t| (t.aggregate_id.clone(), t.version))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn eight_concurrent_claimers_over_10000_tasks_never_claim_one_twice() {
    let db = testkit::database().await;
    sqlx::query(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'O-' || g, 1, '{}' FROM generate_series(1, 10000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let store = Store::new(db.pool.clone());
    let claimed = Arc::new(Mutex::new(Vec::new()));

    let claimers: Vec<_> = (0..8)
        .map(|i| {
            let (store, claimed) = (store.clone(), claimed.clone());
            tokio::spawn(async move {
                let name = format!("relay-{i}");
                let mut idle_rounds = 0;
                while idle_rounds < 3 {
                    let batch = store.claim_batch(&spec(&name, 100)).await.unwrap().tasks;
                    if batch.is_empty() {
                        idle_rounds += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    idle_rounds = 0;
                    for task in &batch {
                        assert!(store.complete(task.id, task.token).await.unwrap());
                    }
                    claimed.lock().unwrap().extend(batch.iter().map(|t| t.id));
                }
            })
        })
        .collect();
    for c in claimers {
        c.await.unwrap();
    }

    let claimed = claimed.lock().unwrap().clone();
    let unique: HashSet<_> = claimed.iter().collect();
    assert_eq!(unique.len(), claimed.len(), "a task was claimed twice");
    assert_eq!(claimed.len(), 10_000);
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state = 'done'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(done, 10_000);
}

#[tokio::test]
async fn an_outcome_carrying_a_stale_claim_token_changes_nothing() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    let id = insert_task(&db.pool, "A", 1).await;
    let lapsed = store
        .claim_batch(&ClaimSpec {
            lease: Duration::ZERO,
            ..spec("slow-relay", 10)
        })
        .await
        .unwrap()
        .tasks
        .remove(0);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(store.rescue_expired(100).await.unwrap().len(), 1);
    let current = store
        .claim_batch(&spec("fast-relay", 10))
        .await
        .unwrap()
        .tasks
        .remove(0);
    assert_eq!(current.id, id);
    assert_ne!(current.token, lapsed.token);

    let old = lapsed.token;
    assert!(!store.complete(id, old).await.unwrap());
    assert!(!store
        .retry_later(id, old, chrono::Utc::now(), "late", None)
        .await
        .unwrap());
    assert!(!store.mark_dead(id, old, "late", None).await.unwrap());
    assert!(!store.release(id, old).await.unwrap());

    assert_eq!(state_of(&db.pool, id).await, "running");
    let holder: String = sqlx::query_scalar("SELECT claimed_by FROM outbox WHERE id = $1")
        .bind(id.0)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(holder, "fast-relay");
    assert!(store.complete(id, current.token).await.unwrap());
    assert_eq!(state_of(&db.pool, id).await, "done");
}

#[tokio::test]
async fn only_the_newest_pending_version_is_sent_and_older_ones_are_superseded() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    let v1 = insert_task(&db.pool, "A", 1).await;
    let v2 = insert_task(&db.pool, "A", 2).await;
    let v3 = insert_task(&db.pool, "A", 3).await;
    insert_task(&db.pool, "B", 1).await;

    let claim = store.claim_batch(&spec("r", 10)).await.unwrap();
    let claimed = claim.tasks;

    assert_eq!(claim.superseded, 2);
    assert_eq!(versions(&claimed), [("A".into(), 3), ("B".into(), 1)]);
    assert_eq!(
        claimed
            .iter()
            .find(|t| t.aggregate_id == "A")
            .unwrap()
            .payload_json()
            .unwrap()["v"],
        3
    );
    assert_eq!(state_of(&db.pool, v1).await, "superseded");
    assert_eq!(state_of(&db.pool, v2).await, "superseded");
    assert_eq!(state_of(&db.pool, v3).await, "running");
}

#[tokio::test]
async fn an_order_with_a_version_in_flight_waits_and_does_not_block_others() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    insert_task(&db.pool, "A", 1).await;
    let a1 = claim(&store, 10).await.remove(0);
    insert_task(&db.pool, "A", 2).await;
    insert_task(&db.pool, "B", 1).await;

    let while_a1_runs = claim(&store, 10).await;
    assert_eq!(versions(&while_a1_runs), [("B".into(), 1)]);

    // A transient failure of A/1 puts it back with a backoff; A/2 is newer,
    // so A/2 goes next and A/1 is never sent again.
    let later = chrono::Utc::now() + chrono::Duration::seconds(60);
    assert!(store
        .retry_later(a1.id, a1.token, later, "503", None)
        .await
        .unwrap());
    let next = claim(&store, 10).await;
    assert_eq!(versions(&next), [("A".into(), 2)]);
    assert_eq!(state_of(&db.pool, a1.id).await, "superseded");
}

#[tokio::test]
async fn no_newer_version_is_sent_while_an_unanswered_attempt_may_still_land() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    insert_task(&db.pool, "A", 1).await;
    let a1 = claim(&store, 10).await.remove(0);
    // A/1 timed out: 1C may still be applying it for the next hour.
    let now = chrono::Utc::now();
    let doubt = now + chrono::Duration::hours(1);
    assert!(store
        .retry_later(a1.id, a1.token, now, "timeout", Some(doubt))
        .await
        .unwrap());
    // Retrying A/1 itself is safe: at worst 1C sees it twice.
    let again = claim(&store, 10).await;
    assert_eq!(versions(&again), [("A".into(), 1)]);
    let a1 = &again[0];
    assert!(store
        .retry_later(a1.id, a1.token, now, "timeout", None)
        .await
        .unwrap());

    // A/2 must wait: sent now, it could be overtaken by the late A/1.
    let a2 = insert_task(&db.pool, "A", 2).await;
    insert_task(&db.pool, "B", 1).await;
    let meanwhile = claim(&store, 10).await;
    assert_eq!(versions(&meanwhile), [("B".into(), 1)]);
    assert_eq!(state_of(&db.pool, a2).await, "pending");

    // An hour passes: the doubt ends, and so does the wait it imposed.
    sqlx::query(
        "UPDATE outbox SET in_doubt_until = now() - interval '1 second',
             run_at = least(run_at, now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let after = claim(&store, 10).await;
    assert_eq!(versions(&after), [("A".into(), 2)]);
}

#[tokio::test]
async fn a_full_page_of_candidates_reports_more_even_when_versions_share_an_order() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    for v in 1..=3 {
        insert_task(&db.pool, "A", v).await;
        insert_task(&db.pool, "B", v).await;
    }
    insert_task(&db.pool, "C", 1).await;
    let page = store.claim_batch(&spec("r", 4)).await.unwrap();
    assert_eq!(versions(&page.tasks), [("A".into(), 3), ("B".into(), 3)]);
    assert!(page.more, "4 candidates filled the page of 4");
    let rest = store.claim_batch(&spec("r", 4)).await.unwrap();
    assert_eq!(versions(&rest.tasks), [("C".into(), 1)]);
    assert!(!rest.more);
}

#[tokio::test]
async fn a_version_older_than_a_delivered_one_is_never_sent() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    insert_task(&db.pool, "A", 2).await;
    let a2 = claim(&store, 10).await.remove(0);
    assert!(store.complete(a2.id, a2.token).await.unwrap());
    // A straggler older than what 1C already has, e.g. restored by hand.
    let a1 = insert_task(&db.pool, "A", 1).await;

    assert!(claim(&store, 10).await.is_empty());
    assert_eq!(state_of(&db.pool, a1).await, "superseded");
}

/// Claimers race while new versions keep arriving: no order ever has two
/// versions in flight, and each order's deliveries only go up in version.
#[tokio::test]
async fn per_order_order_holds_under_concurrent_claims_and_saves() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    let (orders, versions_per_order) = (20, 15);
    let in_flight = Arc::new(Mutex::new(HashSet::new()));
    let delivered: Arc<Mutex<HashMap<String, Vec<i64>>>> = Arc::default();

    let pool = db.pool.clone();
    let writer = tokio::spawn(async move {
        for v in 1..=versions_per_order {
            for o in 0..orders {
                insert_task(&pool, &format!("O{o}"), v).await;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    let claimers: Vec<_> = (0..6)
        .map(|i| {
            let (store, in_flight, delivered) =
                (store.clone(), in_flight.clone(), delivered.clone());
            tokio::spawn(async move {
                let name = format!("r{i}");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while tokio::time::Instant::now() < deadline {
                    let batch = store.claim_batch(&spec(&name, 7)).await.unwrap().tasks;
                    for t in &batch {
                        assert!(
                            in_flight.lock().unwrap().insert(t.aggregate_id.clone()),
                            "{} twice in flight",
                            t.aggregate_id
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    for t in batch {
                        delivered
                            .lock()
                            .unwrap()
                            .entry(t.aggregate_id.clone())
                            .or_default()
                            .push(t.version);
                        in_flight.lock().unwrap().remove(&t.aggregate_id);
                        assert!(store.complete(t.id, t.token).await.unwrap());
                    }
                    let open: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM outbox WHERE state IN ('pending', 'running')",
                    )
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
                    if open == 0
                        && delivered
                            .lock()
                            .unwrap()
                            .values()
                            .filter(|v| v.last() == Some(&versions_per_order))
                            .count()
                            == orders as usize
                    {
                        break;
                    }
                }
            })
        })
        .collect();
    writer.await.unwrap();
    for c in claimers {
        c.await.unwrap();
    }

    let delivered = delivered.lock().unwrap();
    assert_eq!(delivered.len(), orders as usize);
    for (order, sent) in delivered.iter() {
        assert!(
            sent.windows(2).all(|w| w[0] < w[1]),
            "{order} went back: {sent:?}"
        );
        assert_eq!(
            sent.last(),
            Some(&versions_per_order),
            "{order} missed its latest version"
        );
    }
}

/// A relay that claimed and died: no one else touches the order until the
/// lease runs out; then the rescue hands it to another relay, and the dead
/// relay's token is worthless.
#[tokio::test]
async fn a_crashed_claim_is_rescued_and_delivered_by_another_relay() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    let id = insert_task(&db.pool, "A", 1).await;
    let short = ClaimSpec {
        lease: Duration::from_millis(300),
        ..spec("doomed", 10)
    };
    let crashed = store.claim_batch(&short).await.unwrap().tasks.remove(0);

    assert!(
        store.rescue_expired(100).await.unwrap().is_empty(),
        "the lease still holds"
    );
    assert!(store
        .claim_batch(&spec("survivor", 10))
        .await
        .unwrap()
        .tasks
        .is_empty());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.rescue_expired(100).await.unwrap().len(), 1);
    let taken = store
        .claim_batch(&spec("survivor", 10))
        .await
        .unwrap()
        .tasks
        .remove(0);
    assert!(store.complete(taken.id, taken.token).await.unwrap());

    assert_eq!(taken.id, id);
    assert_eq!(taken.attempts, 2, "the crashed attempt counts");
    assert!(!store.complete(id, crashed.token).await.unwrap());
    assert_eq!(state_of(&db.pool, id).await, "done");
}

#[tokio::test]
async fn a_released_task_is_claimable_at_once_with_its_attempt_refunded() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    insert_task(&db.pool, "A", 1).await;
    let t = store
        .claim_batch(&spec("stopping", 10))
        .await
        .unwrap()
        .tasks
        .remove(0);

    assert!(store.release(t.id, t.token).await.unwrap());
    let again = store
        .claim_batch(&spec("other", 10))
        .await
        .unwrap()
        .tasks
        .remove(0);

    assert_eq!((again.id, again.attempts), (t.id, 1));
}

#[tokio::test]
async fn dead_tasks_are_listed_and_replayed_unless_a_newer_version_exists() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    insert_task(&db.pool, "A", 1).await;
    insert_task(&db.pool, "B", 1).await;
    for t in claim(&store, 10).await {
        assert!(store
            .mark_dead(t.id, t.token, "400: bad payload", None)
            .await
            .unwrap());
    }
    insert_task(&db.pool, "B", 2).await;
    let dead = store
        .list_tasks(None, TaskState::Dead, None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].last_error.as_deref(), Some("400: bad payload"));
    let (a, b) = (TaskId(dead[0].id), TaskId(dead[1].id));

    let replayed = store.retry_task(a).await.unwrap();
    assert_eq!((replayed.state, replayed.attempts), (TaskState::Pending, 0));
    assert!(matches!(
        store.retry_task(b).await,
        Err(store::Error::TaskNotReplayable { .. })
    ));
    assert!(matches!(
        store.retry_task(a).await,
        Err(store::Error::TaskNotReplayable { .. })
    ));
    assert!(matches!(
        store.retry_task(TaskId(999_999)).await,
        Err(store::Error::TaskNotFound(_))
    ));
    let page = store
        .list_tasks(Some(&ONEC), TaskState::Dead, Some(a), 10)
        .await
        .unwrap();
    assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), [b.0]);
}

#[tokio::test]
async fn a_batched_completion_is_fenced_claim_by_claim() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    for o in ["A", "B", "C"] {
        insert_task(&db.pool, o, 1).await;
    }
    let claimed = claim(&store, 10).await;
    let mut claims: Vec<_> = claimed.iter().map(|t| (t.id, t.token)).collect();
    // One claim carries a token that is not (or no longer) the task's.
    claims[1].1 = store::ClaimToken::own(uuid::Uuid::new_v4());

    let completed = store.complete_many(&claims).await.unwrap();

    assert_eq!(completed, 2);
    assert_eq!(state_of(&db.pool, claims[0].0).await, "done");
    assert_eq!(state_of(&db.pool, claims[1].0).await, "running");
    assert_eq!(state_of(&db.pool, claims[2].0).await, "done");
    assert_eq!(store.complete_many(&[]).await.unwrap(), 0);
}

/// Claims `limit` at a time until `wanted` orders are among the claimed;
/// returns how many claims that took and every version claimed.
async fn claims_until(
    store: &Store,
    limit: u32,
    wanted: &HashSet<String>,
) -> (usize, Vec<(String, i64)>) {
    let mut all = Vec::new();
    for n in 1..=500 {
        all.extend(versions(&claim(store, limit).await));
        if wanted
            .iter()
            .all(|o| all.iter().any(|(order, _)| order == o))
        {
            return (n, all);
        }
    }
    panic!("{wanted:?} not claimed in 500 claims; claimed {all:?}");
}

async fn insert_fresh(pool: &PgPool, prefix: &str, n: usize) -> HashSet<String> {
    let mut orders = HashSet::new();
    for i in 0..n {
        let order = format!("{prefix}-{i}");
        insert_task(pool, &order, 1).await;
        orders.insert(order);
    }
    orders
}

/// 1,000 orders wait out an in-doubt attempt with a due newer version each,
/// older than everything else. They once filled every candidate page, so
/// nothing behind them was claimed for `ONEC_IN_DOUBT`; now each claim parks
/// the page's held versions until the doubt ends.
#[tokio::test]
async fn versions_held_behind_an_unanswered_attempt_take_no_candidate_slots() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    sqlx::raw_sql(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, run_at, in_doubt_until)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'H-' || g, 1, '{}', now() + interval '1 hour', now() + interval '1 hour'
         FROM generate_series(1, 1000) g;
         INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, run_at)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'H-' || g, 2, '{}', now() - interval '1 minute' FROM generate_series(1, 1000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let fresh = insert_fresh(&db.pool, "F", 10).await;

    let (claims, claimed) = claims_until(&store, 10, &fresh).await;
    assert!(
        claimed.iter().all(|(order, _)| order.starts_with("F-")),
        "a held version went out: {claimed:?}"
    );
    // Each claim parks at most a page of held versions.
    assert!(claims <= 1000 / 10 + 2, "{claims} claims");
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox
         WHERE version = 2 AND state = 'pending' AND run_at > now() + interval '59 minutes'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        parked, 1000,
        "every held version waits until its doubt ends"
    );

    // From now on a fresh order is claimed by the very next claim.
    let later = insert_fresh(&db.pool, "G", 10).await;
    let (claims, _) = claims_until(&store, 10, &later).await;
    assert_eq!(claims, 1);
}

/// A newer version whose order is running on another relay is parked for a
/// second at most (a missed wake-up costs no more), and is due again the
/// moment the running version is done with.
#[tokio::test]
async fn a_version_behind_a_running_one_is_parked_and_comes_back_when_it_finishes() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    insert_task(&db.pool, "A", 1).await;
    let a1 = claim(&store, 10).await.remove(0);
    let a2 = insert_task(&db.pool, "A", 2).await;
    let fresh = insert_fresh(&db.pool, "F", 3).await;

    let (_, claimed) = claims_until(&store, 1, &fresh).await;
    assert!(!claimed.contains(&("A".into(), 2)));
    let parked: bool = sqlx::query_scalar(
        "SELECT run_at > now() AND run_at <= now() + interval '1 second'
         FROM outbox WHERE id = $1",
    )
    .bind(a2.0)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        parked,
        "A/2 waits out of the candidate pages, for a second at most"
    );

    assert_eq!(store.complete_many(&[(a1.id, a1.token)]).await.unwrap(), 1);
    assert_eq!(versions(&claim(&store, 10).await), [("A".into(), 2)]);
}

//! At most one pending 1C row per order: a save rewrites its order's
//! pending row in place, and adds a row only when the pending one runs or
//! its attempt is in doubt.

use std::sync::LazyLock;
use std::time::Duration;

use domain::{DeliveryPolicy, Destination, OrderFull, OrderId, ValidOrder};
use sqlx::PgPool;
use store::{ClaimSpec, ClaimedTask, Precondition, SaveContext, Store};

static ONEC: LazyLock<Destination> = LazyLock::new(Destination::onec);

fn order(id: &str, status: &str) -> ValidOrder {
    let full: OrderFull =
        serde_json::from_value(testkit::sample_order_with(id, status, 10.0)).unwrap();
    full.validate(Some(&OrderId::parse(id).unwrap())).unwrap()
}

async fn save(store: &Store, id: &str, status: &str) -> i64 {
    store
        .save_order(
            &order(id, status),
            Precondition::None,
            &SaveContext::default(),
        )
        .await
        .unwrap()
        .view
        .version
}

async fn claim(store: &Store) -> Vec<ClaimedTask> {
    let spec = ClaimSpec {
        destination: &ONEC,
        policy: DeliveryPolicy::LatestWins,
        claimant: "r",
        limit: 100,
        lease: Duration::from_secs(60),
    };
    store.claim_batch(&spec).await.unwrap().tasks
}

/// The order's 1C rows as (state, version, the payload's status), by id.
async fn rows(pool: &PgPool, id: &str) -> Vec<(String, i64, String)> {
    sqlx::query_as(
        "SELECT state, version, payload->'order'->>'status' FROM outbox
         WHERE destination = 'onec' AND aggregateid = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn saves_coalesce_into_the_pending_row_until_it_runs_and_never_into_one_in_doubt() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    for status in ["new", "paid", "shipped"] {
        save(&store, "CO-1", status).await;
    }
    let one = rows(&db.pool, "CO-1").await;
    assert_eq!(one.len(), 1, "three saves, one pending row: {one:?}");
    assert_eq!(one[0].0, "pending");
    assert_eq!(
        (one[0].1, one[0].2.as_str()),
        (3, "shipped"),
        "the row carries the newest version and its snapshot"
    );

    // Claimed, the row runs: the next save adds a row, and the one after
    // coalesces into that one.
    let claimed = claim(&store).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].version, 3);
    save(&store, "CO-1", "delivered").await;
    save(&store, "CO-1", "closed").await;
    let two = rows(&db.pool, "CO-1").await;
    assert_eq!(
        two.iter().map(|r| (r.0.as_str(), r.1)).collect::<Vec<_>>(),
        [("running", 3), ("pending", 5)]
    );

    // An attempt in doubt may still land in 1C: a save never rewrites that
    // row, and the newer version waits behind it.
    save(&store, "CO-2", "new").await;
    let doubt = claim(&store).await;
    let doubt = doubt.iter().find(|t| t.aggregate_id == "CO-2").unwrap();
    let until = chrono::Utc::now() + chrono::Duration::seconds(60);
    assert!(store
        .retry_later(
            doubt.id,
            doubt.token,
            chrono::Utc::now(),
            "timeout",
            Some(until)
        )
        .await
        .unwrap());
    save(&store, "CO-2", "paid").await;
    let held = rows(&db.pool, "CO-2").await;
    assert_eq!(
        held.iter().map(|r| (r.0.as_str(), r.1)).collect::<Vec<_>>(),
        [("pending", 1), ("pending", 2)],
        "the doubtful row keeps version 1"
    );
    let next = claim(&store).await;
    assert!(
        next.iter()
            .all(|t| t.aggregate_id != "CO-2" || t.version == 1),
        "version 2 must wait while version 1 may land: {:?}",
        next.iter()
            .map(|t| (&t.aggregate_id, t.version))
            .collect::<Vec<_>>()
    );
}

/// A claim that locked the pending row first: the save waits for it. If
/// the claim took the row, the save adds one; if it let it go, the save
/// rewrites it. Either way the newer version is queued.
#[tokio::test]
async fn a_save_racing_a_claim_of_its_pending_row_coalesces_or_adds_and_keeps_the_newer_version() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    for (id, claim_takes_it) in [("RACE-1", true), ("RACE-2", false)] {
        save(&store, id, "new").await;
        let mut claimer = db.pool.begin().await.unwrap();
        let row: i64 = sqlx::query_scalar(
            "SELECT id FROM outbox WHERE aggregateid = $1 AND state = 'pending' FOR UPDATE",
        )
        .bind(id)
        .fetch_one(&mut *claimer)
        .await
        .unwrap();
        let saving = tokio::spawn({
            let store = store.clone();
            async move { save(&store, id, "paid").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!saving.is_finished(), "the save waits for the claim's lock");
        if claim_takes_it {
            sqlx::query(
                "UPDATE outbox SET state = 'running', attempts = attempts + 1, claimed_by = 'r',
                     claim_token = gen_random_uuid(),
                     claim_expires_at = now() + interval '1 minute'
                 WHERE id = $1",
            )
            .bind(row)
            .execute(&mut *claimer)
            .await
            .unwrap();
            claimer.commit().await.unwrap();
        } else {
            claimer.rollback().await.unwrap();
        }
        assert_eq!(saving.await.unwrap(), 2);
        let after = rows(&db.pool, id).await;
        let row = |state: &str, version, status: &str| (state.into(), version, status.into());
        let expected: Vec<(String, i64, String)> = if claim_takes_it {
            vec![row("running", 1, "new"), row("pending", 2, "paid")]
        } else {
            vec![row("pending", 2, "paid")]
        };
        assert_eq!(after, expected, "{id}");
    }
}

/// Saves and claims of one order at full speed, side by side: every claim
/// sends a newer version than the one before, and once the saves stop, the
/// last claim sends the last version saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_and_claims_side_by_side_never_lose_or_reorder_a_version() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    save(&store, "RUSH", "new").await;
    let saving = tokio::spawn({
        let store = store.clone();
        async move {
            let mut last = 1;
            for i in 0..300 {
                last = save(&store, "RUSH", if i % 2 == 0 { "paid" } else { "new" }).await;
            }
            last
        }
    });
    let mut sent = Vec::new();
    loop {
        let done = saving.is_finished();
        for task in claim(&store).await {
            sent.push(task.version);
            assert!(store.complete(task.id, task.token).await.unwrap());
        }
        if done && claim(&store).await.is_empty() {
            break;
        }
    }
    let last = saving.await.unwrap();
    assert!(
        sent.windows(2).all(|w| w[0] < w[1]),
        "1C never goes back: {sent:?}"
    );
    assert_eq!(sent.last(), Some(&last), "the last version reaches 1C");
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE aggregateid = 'RUSH' AND state = 'pending'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending, 0);
}

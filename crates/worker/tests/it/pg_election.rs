//! The `postgres` lease backend on real PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use store::Store;
use tokio_util::sync::CancellationToken;
use worker::{ElectionConfig, Elector, Leader, PgLease};

use crate::support::{leaders, wait_for_one_leader, Candidate};

const TIMING: ElectionConfig = ElectionConfig {
    lease_duration: Duration::from_secs(3),
    renew_deadline: Duration::from_secs(2),
    retry_period: Duration::from_millis(500),
};

fn candidates(store: &Store, n: usize, timing: ElectionConfig) -> Vec<Candidate> {
    (0..n)
        .map(|i| {
            let shutdown = CancellationToken::new();
            let lock = PgLease::new(
                store.clone(),
                "relay",
                &format!("relay-{i}"),
                timing.lease_duration,
                shutdown.clone(),
            );
            let (elector, task) = Elector::start(Arc::new(lock), timing, shutdown.clone());
            Candidate {
                elector,
                task,
                shutdown,
            }
        })
        .collect()
}

#[tokio::test]
async fn three_candidates_give_exactly_one_leader_at_every_sample_over_30_seconds() {
    let db = testkit::database().await;
    let cs = candidates(&Store::new(db.pool.clone()), 3, TIMING);
    let (first, _) = wait_for_one_leader(&cs, Duration::from_secs(5)).await;

    let started = Instant::now();
    let mut samples = 0;
    while started.elapsed() < Duration::from_secs(30) {
        assert_eq!(
            leaders(&cs),
            [first],
            "sample {samples} after {:?}",
            started.elapsed()
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert!(samples > 300, "{samples} samples");
    let transitions: i64 =
        sqlx::query_scalar("SELECT transitions FROM leader_leases WHERE name = 'relay'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(transitions, 0, "the lease never changed hands");
    for c in cs {
        c.shutdown.cancel();
        c.task.await.unwrap();
    }
}

/// A killed leader neither renews nor releases: another candidate takes
/// over once its lease expires, within the lease duration plus one retry.
#[tokio::test]
async fn a_killed_leader_is_replaced_within_the_lease_duration_and_one_retry() {
    let db = testkit::database().await;
    let mut cs = candidates(&Store::new(db.pool.clone()), 3, TIMING);
    let (leader, _) = wait_for_one_leader(&cs, Duration::from_secs(5)).await;

    let killed = cs.remove(leader);
    killed.task.abort();
    let (_, took) = wait_for_one_leader(&cs, Duration::from_secs(10)).await;

    let bound = TIMING.lease_duration + TIMING.retry_period;
    println!("new leader after {took:?} (bound {bound:?})");
    assert!(took <= bound + Duration::from_millis(300), "took {took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "took over a live lease after {took:?}"
    );
    for c in cs {
        c.shutdown.cancel();
        c.task.await.unwrap();
    }
}

/// A leader that shuts down releases the lease and its NOTIFY wakes the
/// candidates, so a successor leads long before any retry period ends.
#[tokio::test]
async fn a_resigning_leader_hands_over_at_once() {
    let db = testkit::database().await;
    let slow_retries = ElectionConfig {
        lease_duration: Duration::from_secs(30),
        renew_deadline: Duration::from_secs(20),
        retry_period: Duration::from_secs(10),
    };
    let mut cs = candidates(&Store::new(db.pool.clone()), 2, slow_retries);
    let (leader, _) = wait_for_one_leader(&cs, Duration::from_secs(5)).await;
    // Let the other candidate settle into its 10 s wait.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let resigning = cs.remove(leader);
    let started = Instant::now();
    resigning.shutdown.cancel();
    resigning.task.await.unwrap();
    let (_, _) = wait_for_one_leader(&cs, Duration::from_secs(5)).await;
    let took = started.elapsed();

    assert!(took < Duration::from_secs(2), "hand-over took {took:?}");
    assert!(!resigning.elector.is_leader());
    for c in cs {
        c.shutdown.cancel();
        c.task.await.unwrap();
    }
}

/// A lease row still naming a holder that does not lead is not renewed by
/// it: it expires, and then anyone (the holder too) may take it.
#[tokio::test]
async fn a_lease_row_naming_us_is_renewed_only_while_we_lead() {
    let store = Store::new(testkit::database().await.pool);
    let held = |renew| store.try_acquire_lease("relay", "relay-0", Duration::from_secs(1), renew);
    assert!(
        held(false).await.unwrap().is_some(),
        "a free lease is taken"
    );
    assert!(
        held(true).await.unwrap().is_some(),
        "a leader renews its own"
    );
    assert!(
        held(false).await.unwrap().is_none(),
        "not leading: our own live row is left to expire"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = held(false).await.unwrap().expect("expired: anyone's");
    assert_eq!(again.transitions, 0, "the same holder: no transition");
}

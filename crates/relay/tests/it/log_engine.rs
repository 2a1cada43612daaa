//! The log's delivery engine over real PostgreSQL, through a scripted sink
//! (the seam): two relays share the partitions, every event is delivered
//! once and in order per key, a failure that may pass is retried from
//! where it stopped, and a refusal is buried while its partition goes on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::Destination;
use relay::{Controls, LogEngine, ProtectionConfig, RelayMetrics, SinkGuard};
use sink::{Failure, FailureKind, Message, Outcome, Sink};
use sqlx::PgPool;
use store::log::{append, Append};
use store::Store;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::{BreakerConfig, BreakerState, SystemClock};

use crate::support::config;

/// Records what it delivered; fails `(key, version)` as scripted, a
/// transient failure only as many times as given; with `unwell`, every
/// message fails as a destination that is down.
#[derive(Default)]
struct Scripted {
    delivered: Mutex<Vec<(String, i64)>>,
    transient: Mutex<HashMap<(String, i64), u32>>,
    refused: Vec<(String, i64)>,
    unwell: bool,
}

#[async_trait::async_trait]
impl Sink for Scripted {
    async fn deliver(&self, m: &Message) -> Outcome {
        let id = (m.aggregate_id.clone(), m.version);
        if self.unwell {
            return Err(Failure {
                counts_against_destination: true,
                ..failure(FailureKind::Transient, "unavailable")
            });
        }
        if self.refused.contains(&id) {
            return Err(failure(FailureKind::Permanent, "rejected"));
        }
        if let Some(left) = self.transient.lock().unwrap().get_mut(&id) {
            if *left > 0 {
                *left -= 1;
                return Err(failure(FailureKind::Transient, "timeout"));
            }
        }
        self.delivered.lock().unwrap().push(id);
        Ok(())
    }
}

fn failure(kind: FailureKind, class: &'static str) -> Failure {
    Failure {
        kind,
        class,
        counts_against_destination: false,
        retry_after: None,
        detail: format!("{class} from the script"),
    }
}

fn kafka() -> Destination {
    "kafka".parse().unwrap()
}

/// `keys` keys with `versions` versions each, appended version by version
/// in one transaction per version, as saves would.
async fn appended(pool: &PgPool, keys: usize, versions: i64) {
    sqlx::query("UPDATE log_config SET partitions = 4")
        .execute(pool)
        .await
        .unwrap();
    let destination = kafka();
    let names: Vec<String> = (0..keys).map(|k| format!("K-{k}")).collect();
    for version in 1..=versions {
        let mut tx = pool.begin().await.unwrap();
        let payload = serde_json::json!({"version": version});
        let batch: Vec<_> = names
            .iter()
            .map(|key| Append {
                destination: &destination,
                stream: "order",
                key,
                kind: "order.updated",
                version,
                event_id: Uuid::now_v7(),
                payload: &payload,
                traceparent: None,
            })
            .collect();
        append(&mut tx, &batch).await.unwrap();
        tx.commit().await.unwrap();
    }
}

async fn engine(pool: &PgPool, sink: Arc<Scripted>, relay_id: &str) -> Arc<LogEngine> {
    let breaker = BreakerConfig {
        failure_threshold: 1000,
        cool_down: Duration::from_secs(60),
    };
    engine_behind(pool, guard(sink, breaker), relay_id)
}

fn guard(sink: Arc<Scripted>, breaker: BreakerConfig) -> Arc<SinkGuard> {
    Arc::new(SinkGuard::new(
        sink,
        ProtectionConfig {
            max_in_flight: 1000,
            rate_per_second: None,
            breaker,
        },
        Arc::new(SystemClock),
        RelayMetrics::new().destination("kafka"),
    ))
}

/// An engine of relay `relay_id` delivering through `guard`.
fn engine_behind(pool: &PgPool, guard: Arc<SinkGuard>, relay_id: &str) -> Arc<LogEngine> {
    let metrics = RelayMetrics::new().destination("kafka");
    let mut service = config().service;
    service.relay_id = relay_id.into();
    service.batch_size = 64;
    let controls = Arc::new(Controls::new(kafka(), guard, service.batch_size));
    LogEngine::new(Store::new(pool.clone()), controls, service, metrics)
}

/// Runs `engines` until `sink` has `n` deliveries (at most 60 s).
async fn until_delivered(engines: &[Arc<LogEngine>], sink: &Scripted, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let lanes = engines.iter().map(|e| {
        let e = e.clone();
        async move {
            while tokio::time::Instant::now() < deadline {
                e.deliver_next(CancellationToken::new()).await.unwrap();
                if sink.delivered.lock().unwrap().len() >= n {
                    return;
                }
            }
        }
    });
    futures::future::join_all(lanes).await;
    assert_eq!(
        sink.delivered.lock().unwrap().len(),
        n,
        "delivered within 60 s"
    );
}

fn by_key(sink: &Scripted) -> BTreeMap<String, Vec<i64>> {
    let mut keys: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, version) in sink.delivered.lock().unwrap().iter() {
        keys.entry(key.clone()).or_default().push(*version);
    }
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_deliver_every_event_once_in_key_order_and_retry_from_a_failure() {
    let db = testkit::database().await;
    appended(&db.pool, 40, 25).await;
    let sink = Arc::new(Scripted::default());
    sink.transient
        .lock()
        .unwrap()
        .extend([(("K-3".into(), 7), 2), (("K-17".into(), 1), 1)]);
    let engines = [
        engine(&db.pool, sink.clone(), "r1").await,
        engine(&db.pool, sink.clone(), "r2").await,
    ];
    until_delivered(&engines, &sink, 1000).await;
    let keys = by_key(&sink);
    assert_eq!(keys.len(), 40);
    for (key, versions) in keys {
        assert_eq!(
            versions,
            (1..=25).collect::<Vec<_>>(),
            "{key}: each once, in order"
        );
    }
    let cursors_held_by: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT owner FROM log_cursors WHERE owner IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(!cursors_held_by.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_event_is_buried_with_its_reason_and_its_partition_goes_on() {
    let db = testkit::database().await;
    appended(&db.pool, 8, 5).await;
    let sink = Arc::new(Scripted {
        refused: vec![("K-5".into(), 2)],
        ..Scripted::default()
    });
    let engines = [engine(&db.pool, sink.clone(), "r1").await];
    until_delivered(&engines, &sink, 39).await;
    assert_eq!(
        by_key(&sink)["K-5"],
        [1, 3, 4, 5],
        "the rest of K-5 goes on"
    );
    let dead: Vec<(String, i64, String, String)> =
        sqlx::query_as("SELECT aggregateid, version, class, reason FROM log_dead")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        dead,
        [(
            "K-5".to_owned(),
            2,
            "rejected".to_owned(),
            "rejected from the script".to_owned()
        )]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_breaker_waiting_for_a_probe_closes_once_another_relay_delivered_everything() {
    let db = testkit::database().await;
    appended(&db.pool, 3, 1).await;
    let down = Arc::new(Scripted {
        unwell: true,
        ..Scripted::default()
    });
    let breaker = BreakerConfig {
        failure_threshold: 1,
        cool_down: Duration::from_millis(50),
    };
    let unwell = guard(down.clone(), breaker);
    let r1 = engine_behind(&db.pool, unwell.clone(), "r1");
    r1.deliver_next(CancellationToken::new()).await.unwrap();
    assert_eq!(unwell.breaker_state(), BreakerState::Open);

    // Another relay delivers everything while r1's breaker cools down.
    let healthy = Arc::new(Scripted::default());
    let r2 = engine(&db.pool, healthy.clone(), "r2").await;
    until_delivered(&[r2], &healthy, 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(unwell.probe_due(), "cooled down, waiting for a probe");

    r1.deliver_next(CancellationToken::new()).await.unwrap();
    assert_eq!(
        unwell.breaker_state(),
        BreakerState::Closed,
        "nothing left to probe with: closed without one"
    );
    assert!(down.delivered.lock().unwrap().is_empty());
}

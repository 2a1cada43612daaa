//! The delivery engine driven step by step through a fake sink (the seam),
//! over real PostgreSQL: each outcome class lands in its state.

use std::sync::Arc;
use std::time::Duration;

use domain::{DeliveryPolicy, Destination};
use relay::{Controls, DeliveryEngine, ProtectionConfig, RelayMetrics, SinkGuard};
use sink::{Failure, FailureKind, MockSink};
use sqlx::PgPool;
use store::Store;
use tokio_util::sync::CancellationToken;
use worker::{BreakerConfig, Progress, SystemClock};

use crate::support::config;

fn failure(kind: FailureKind, class: &'static str, retry_after: Option<Duration>) -> Failure {
    Failure {
        kind,
        class,
        counts_against_destination: kind != FailureKind::Permanent,
        retry_after,
        detail: format!("{class} from the fake"),
    }
}

async fn queue(pool: &PgPool, destination: &str, key: &str, seq: i64) {
    sqlx::query(
        "INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version,
                             payload)
         VALUES (gen_random_uuid(), $1, 'order', $2, 'order.updated', $3,
                 jsonb_build_object('seq', $3))",
    )
    .bind(destination)
    .bind(key)
    .bind(seq)
    .execute(pool)
    .await
    .unwrap();
}

fn engine(pool: &PgPool, sink: MockSink, policy: DeliveryPolicy) -> Arc<DeliveryEngine> {
    let breaker = BreakerConfig {
        failure_threshold: 100,
        cool_down: Duration::from_secs(60),
    };
    engine_with(pool, sink, policy, breaker).0
}

fn engine_with(
    pool: &PgPool,
    sink: MockSink,
    policy: DeliveryPolicy,
    breaker: BreakerConfig,
) -> (Arc<DeliveryEngine>, Arc<SinkGuard>) {
    let metrics = RelayMetrics::new().destination("fake");
    let guard = Arc::new(SinkGuard::new(
        Arc::new(sink),
        ProtectionConfig {
            max_in_flight: 8,
            rate_per_second: None,
            breaker,
        },
        Arc::new(SystemClock),
        metrics.clone(),
    ));
    let mut service = config().service;
    service.max_attempts = 3;
    service.in_doubt = Duration::from_secs(120);
    // Long enough that no retry comes due while a test drives the engine.
    service.backoff = worker::Backoff {
        base: Duration::from_secs(3600),
        max: Duration::from_secs(3600),
    };
    let destination = "fake".parse::<Destination>().unwrap();
    let controls = Controls::new(destination, guard.clone(), service.batch_size);
    let engine = DeliveryEngine::new(
        Store::new(pool.clone()),
        policy,
        Arc::new(controls),
        service,
        metrics,
    );
    (engine, guard)
}

type Row = (String, i32, Option<String>, bool, bool);

/// Per key: state, attempts, last error, whether it waits a minute or more,
/// whether it is held in doubt.
async fn rows(pool: &PgPool) -> Vec<(String, Row)> {
    sqlx::query_as::<_, (String, String, i32, Option<String>, bool, bool)>(
        "SELECT aggregateid, state, attempts, last_error,
                run_at > now() + interval '50 seconds', in_doubt_until IS NOT NULL
         FROM outbox WHERE version = 1 ORDER BY aggregateid",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(k, s, a, e, w, d)| (k, (s, a, e, w, d)))
    .collect()
}

#[tokio::test]
async fn each_outcome_of_the_sink_lands_the_task_in_its_state() {
    let db = testkit::database().await;
    for key in ["ok", "transient", "permanent", "in-doubt"] {
        queue(&db.pool, "fake", key, 1).await;
    }
    // Another destination's task is not this engine's business.
    queue(&db.pool, "other", "ok", 1).await;
    let mut sink = MockSink::new();
    sink.expect_deliver().times(4).returning(|m| {
        assert_eq!(m.kind, "order.updated");
        assert_eq!(m.payload_json().unwrap()["seq"], 1);
        match m.aggregate_id.as_str() {
            "ok" => Ok(()),
            "transient" => Err(failure(
                FailureKind::Transient,
                "throttled",
                Some(Duration::from_secs(60)),
            )),
            "permanent" => Err(failure(FailureKind::Permanent, "rejected", None)),
            _ => Err(failure(FailureKind::InDoubt, "timeout", None)),
        }
    });
    let engine = engine(&db.pool, sink, DeliveryPolicy::LatestWins);

    let progress = engine
        .claim_and_deliver(CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(progress, Progress::Idle);
    let rows = rows(&db.pool).await;
    let row = |key: &str| {
        rows.iter()
            .find(|(k, r)| k == key && r.1 > 0)
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(row("ok"), ("done".into(), 1, None, false, false));
    assert_eq!(
        row("transient"),
        (
            "pending".into(),
            1,
            Some("throttled from the fake".into()),
            true,
            false
        ),
        "retried no sooner than the sink asked"
    );
    assert_eq!(
        row("permanent"),
        (
            "dead".into(),
            1,
            Some("rejected from the fake (permanent)".into()),
            false,
            false
        )
    );
    let (state, attempts, error, _, held) = row("in-doubt");
    assert_eq!((state.as_str(), attempts, held), ("pending", 1, true));
    assert_eq!(error.as_deref(), Some("timeout from the fake"));
    let untouched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE destination = 'other' AND state = 'pending'
           AND attempts = 0",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(untouched, 1);
}

#[tokio::test]
async fn in_order_a_key_behind_an_unanswered_attempt_waits_while_others_flow() {
    let db = testkit::database().await;
    for seq in 1..=3 {
        queue(&db.pool, "fake", "slow", seq).await;
        queue(&db.pool, "fake", "fast", seq).await;
    }
    let mut sink = MockSink::new();
    let mut seq = mockall::Sequence::new();
    sink.expect_deliver()
        .withf(|m| m.aggregate_id == "slow")
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Err(failure(FailureKind::InDoubt, "timeout", None)));
    let sent: Arc<std::sync::Mutex<Vec<i64>>> = Arc::default();
    let record = sent.clone();
    sink.expect_deliver()
        .withf(|m| m.aggregate_id == "fast")
        .times(3)
        .returning(move |m| {
            record
                .lock()
                .unwrap()
                .push(m.payload_json().unwrap()["seq"].as_i64().unwrap());
            Ok(())
        });
    let engine = engine(&db.pool, sink, DeliveryPolicy::EveryMessageInOrder);

    for _ in 0..4 {
        engine
            .claim_and_deliver(CancellationToken::new())
            .await
            .unwrap();
    }

    assert_eq!(*sent.lock().unwrap(), [1, 2, 3], "one key in order");
    let slow: Vec<(i64, String, i32)> = sqlx::query_as(
        "SELECT version, state, attempts FROM outbox WHERE aggregateid = 'slow' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        slow,
        [
            (1, "pending".into(), 1),
            (2, "pending".into(), 0),
            (3, "pending".into(), 0)
        ],
        "nothing overtook the unanswered message, the rest of its run went back \
         untried, and nothing was superseded"
    );
}

#[tokio::test]
async fn in_order_a_run_settles_each_message_through_its_head() {
    let db = testkit::database().await;
    for seq in 1..=3 {
        queue(&db.pool, "fake", "retried", seq).await;
        queue(&db.pool, "fake", "buried", seq).await;
    }
    let sent: Arc<std::sync::Mutex<Vec<(String, i64)>>> = Arc::default();
    let record = sent.clone();
    let mut sink = MockSink::new();
    sink.expect_deliver().returning(move |m| {
        let seq = m.payload_json().unwrap()["seq"].as_i64().unwrap();
        record.lock().unwrap().push((m.aggregate_id.clone(), seq));
        match (m.aggregate_id.as_str(), seq) {
            (_, 1) | ("buried", 3) => Ok(()),
            ("retried", _) => Err(failure(FailureKind::Transient, "throttled", None)),
            _ => Err(failure(FailureKind::Permanent, "rejected", None)),
        }
    });
    let engine = engine(&db.pool, sink, DeliveryPolicy::EveryMessageInOrder);

    for _ in 0..3 {
        engine
            .claim_and_deliver(CancellationToken::new())
            .await
            .unwrap();
    }

    let mut sent = sent.lock().unwrap().clone();
    sent.sort();
    assert_eq!(
        sent,
        [
            ("buried".into(), 1),
            ("buried".into(), 2),
            ("buried".into(), 3),
            ("retried".into(), 1),
            ("retried".into(), 2)
        ],
        "a failure ends its run; a dead message does not hold its key"
    );
    let states: Vec<(String, String, i32, bool)> = sqlx::query_as(
        "SELECT aggregateid, state, attempts, run_at > now() + interval '50 seconds'
         FROM outbox ORDER BY aggregateid, id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let row = |k: &str, s: &str, a: i32, waits: bool| (k.to_owned(), s.to_owned(), a, waits);
    assert_eq!(
        states,
        [
            row("buried", "done", 1, false),
            row("buried", "dead", 1, false),
            row("buried", "done", 1, false),
            row("retried", "done", 1, false),
            // Its backoff outlives the completion of the head it ran
            // behind, and the untried message waits behind it.
            row("retried", "pending", 1, true),
            row("retried", "pending", 0, true),
        ]
    );
}

/// A relay whose breaker opened while others delivered the backlog has no
/// message left to probe with; it closes once the destination has nothing
/// undelivered, and not before.
#[tokio::test]
async fn an_open_breaker_with_nothing_left_to_deliver_closes_without_a_probe() {
    let db = testkit::database().await;
    queue(&db.pool, "fake", "a", 1).await;
    let mut sink = MockSink::new();
    sink.expect_deliver()
        .times(1)
        .returning(|_| Err(failure(FailureKind::Transient, "unavailable", None)));
    // Opens on the first failure; its probe is due at once.
    let breaker = BreakerConfig {
        failure_threshold: 1,
        cool_down: Duration::ZERO,
    };
    let (engine, guard) = engine_with(&db.pool, sink, DeliveryPolicy::LatestWins, breaker);
    engine
        .claim_and_deliver(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(guard.breaker_state(), worker::BreakerState::HalfOpen);

    // The failed task waits out its backoff: still something to protect.
    engine
        .claim_and_deliver(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(guard.breaker_state(), worker::BreakerState::HalfOpen);

    // Another relay delivers it.
    sqlx::query("UPDATE outbox SET state = 'done', finished_at = now() WHERE destination = 'fake'")
        .execute(&db.pool)
        .await
        .unwrap();
    engine
        .claim_and_deliver(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(guard.breaker_state(), worker::BreakerState::Closed);
}

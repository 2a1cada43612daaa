use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::{OrderFull, OrderId};
use onec::{ErrorClass, Failure, MockOnecClient, Outcome};
use onec_mock::Faults;
use store::{Precondition, SaveContext, Store};
use worker::BreakerConfig;

use crate::support::{config, count, eventually, insert_task, mock_1c, RunningRelay};

fn always_failing(class: ErrorClass, calls: Arc<AtomicUsize>) -> Arc<MockOnecClient> {
    let mut client = MockOnecClient::new();
    client.expect_put_order().returning(move |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        Outcome::Failed(Failure {
            class,
            retry_after: None,
            detail: format!("1C says {}", class.as_str()),
        })
    });
    Arc::new(client)
}

/// The poll interval is a minute, so only the save's NOTIFY can explain a
/// delivery within a second.
#[tokio::test]
async fn a_saved_order_reaches_1c_within_moments_of_its_commit() {
    let db = testkit::database().await;
    let mock = mock_1c(Faults::default()).await;
    let relay = RunningRelay::start(&db.pool, mock.client.clone(), config());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let full: OrderFull = serde_json::from_value(testkit::sample_order("FAST-1")).unwrap();
    let order = full
        .validate(Some(&OrderId::parse("FAST-1").unwrap()))
        .unwrap();

    Store::new(db.pool.clone())
        .save_order(&order, Precondition::None, &SaveContext::default())
        .await
        .unwrap();
    let took = eventually(Duration::from_secs(1), || async {
        mock.state.stats().applied == 1
    })
    .await;

    println!("commit to 1C: {took:?}");
    eventually(Duration::from_secs(2), || async {
        count(&db.pool, "SELECT count(*) FROM outbox WHERE state = 'done'").await == 1
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn without_a_notification_the_poll_still_delivers() {
    let db = testkit::database().await;
    let mock = mock_1c(Faults::default()).await;
    let mut cfg = config();
    cfg.service.poll_interval = Duration::from_millis(200);
    let relay = RunningRelay::start(&db.pool, mock.client.clone(), cfg);
    tokio::time::sleep(Duration::from_millis(300)).await;

    insert_task(&db.pool, "QUIET", 1).await;

    eventually(Duration::from_secs(3), || async {
        mock.state.stats().applied == 1
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn transient_failures_back_off_and_go_dead_after_max_attempts() {
    let db = testkit::database().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut cfg = config();
    cfg.service.max_attempts = 3;
    cfg.service.poll_interval = Duration::from_millis(20);
    insert_task(&db.pool, "FLAKY", 1).await;

    let relay = RunningRelay::start(
        &db.pool,
        always_failing(ErrorClass::ServerError, calls.clone()),
        cfg,
    );
    eventually(Duration::from_secs(5), || async {
        count(&db.pool, "SELECT count(*) FROM outbox WHERE state = 'dead'").await == 1
    })
    .await;
    relay.stop().await;

    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 3);
    assert!(
        error.contains("1C says server_error") && error.contains("gave up after 3 attempts"),
        "{error}"
    );
}

#[tokio::test]
async fn a_permanent_failure_is_dead_after_one_attempt_and_others_still_flow() {
    let db = testkit::database().await;
    let mut client = MockOnecClient::new();
    client.expect_put_order().returning(|d| {
        if d.order_id == "BAD" {
            Outcome::Failed(Failure {
                class: ErrorClass::Rejected,
                retry_after: None,
                detail: "1C answered 400".into(),
            })
        } else {
            Outcome::Delivered(onec::Applied::Applied)
        }
    });
    insert_task(&db.pool, "BAD", 1).await;
    insert_task(&db.pool, "GOOD", 1).await;

    let relay = RunningRelay::start(&db.pool, Arc::new(client), config());
    eventually(Duration::from_secs(5), || async {
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE state IN ('done', 'dead')",
        )
        .await
            == 2
    })
    .await;
    relay.stop().await;

    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM outbox WHERE aggregateid = 'BAD'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempts), ("dead", 1));
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE aggregateid = 'GOOD' AND state = 'done'"
        )
        .await,
        1
    );
}

/// While 1C is down the breaker opens: only a handful of tasks are tried,
/// the rest of the backlog keeps its attempts, and nothing goes dead.
#[tokio::test]
async fn an_outage_opens_the_breaker_and_spares_the_backlog() {
    let db = testkit::database().await;
    for i in 0..200 {
        insert_task(&db.pool, &format!("O{i}"), 1).await;
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let mut cfg = config();
    cfg.service.batch_size = 5;
    cfg.service.poll_interval = Duration::from_millis(20);
    cfg.protection.max_in_flight = 4;
    cfg.protection.breaker = BreakerConfig {
        failure_threshold: 3,
        cool_down: Duration::from_secs(60),
    };

    let relay = RunningRelay::start(
        &db.pool,
        always_failing(ErrorClass::Unavailable, calls.clone()),
        cfg,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.stop().await;

    let tried = count(&db.pool, "SELECT count(*) FROM outbox WHERE attempts > 0").await;
    assert!(
        calls.load(Ordering::SeqCst) <= 10,
        "{} calls reached a dead 1C",
        calls.load(Ordering::SeqCst)
    );
    assert!(tried <= 10, "{tried} tasks spent attempts on the outage");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox WHERE state = 'dead'").await,
        0
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE state = 'running'"
        )
        .await,
        0
    );
}

/// On shutdown, deliveries already sent finish and everything claimed but
/// unsent is released at once, not left for the lease to expire.
#[tokio::test]
async fn shutdown_finishes_sent_deliveries_and_releases_the_rest() {
    let db = testkit::database().await;
    for i in 0..40 {
        insert_task(&db.pool, &format!("S{i}"), 1).await;
    }
    let mock = mock_1c(Faults {
        latency_ms: 300,
        ..Faults::default()
    })
    .await;
    let mut cfg = config();
    cfg.protection.max_in_flight = 2;
    cfg.service.lease = Duration::from_secs(600);

    let relay = RunningRelay::start(&db.pool, mock.client.clone(), cfg);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let stop_took = relay.stop().await;

    assert!(
        stop_took < Duration::from_secs(2),
        "shutdown took {stop_took:?}"
    );
    let done = count(&db.pool, "SELECT count(*) FROM outbox WHERE state = 'done'").await;
    assert_eq!(
        done as u64,
        mock.state.stats().applied,
        "every sent delivery was recorded"
    );
    assert!(done >= 2);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE state = 'running'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox WHERE state = 'pending' AND claimed_by IS NULL AND attempts = 0").await,
        40 - done
    );
}

#[tokio::test]
async fn requests_in_flight_never_exceed_the_limit() {
    let db = testkit::database().await;
    for i in 0..60 {
        insert_task(&db.pool, &format!("L{i}"), 1).await;
    }
    let mock = mock_1c(Faults {
        latency_ms: 30,
        ..Faults::default()
    })
    .await;
    let mut cfg = config();
    cfg.protection.max_in_flight = 4;
    cfg.service.claim_lanes = 3;
    cfg.service.poll_interval = Duration::from_millis(50);

    let relay = RunningRelay::start(&db.pool, mock.client.clone(), cfg);
    eventually(Duration::from_secs(10), || async {
        mock.state.stats().applied == 60
    })
    .await;
    relay.stop().await;

    let max = mock.state.stats().max_in_flight;
    assert!((2..=4).contains(&max), "max in flight {max}");
}

#[tokio::test]
async fn a_rate_limit_spaces_requests_out() {
    let db = testkit::database().await;
    for i in 0..30 {
        insert_task(&db.pool, &format!("R{i}"), 1).await;
    }
    let mock = mock_1c(Faults::default()).await;
    let mut cfg = config();
    cfg.protection.rate_per_second = std::num::NonZeroU32::new(20);
    cfg.service.poll_interval = Duration::from_millis(50);

    let relay = RunningRelay::start(&db.pool, mock.client.clone(), cfg);
    let took = eventually(Duration::from_secs(10), || async {
        mock.state.stats().applied == 30
    })
    .await;
    relay.stop().await;

    // 20 per second with a burst of 20: the last 10 need about half a second.
    assert!(
        took >= Duration::from_millis(400),
        "30 requests in {took:?}"
    );
}

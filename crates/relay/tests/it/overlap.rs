//! Two relays that both believe they lead, at the same time, for the whole
//! run: the maintenance jobs must stay correct anyway. A trigger records
//! every state change that matters, so the checks see what really happened.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use onec_mock::Faults;
use relay::Leadership;
use tower::ServiceExt;
use worker::Leader;

use crate::support::{config, count, eventually, mock_1c, RunningRelay};

const AUDIT: &str = "
CREATE TABLE audit (task_id bigint, old_state text, new_state text, old_token uuid, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION audit_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state IS DISTINCT FROM NEW.state THEN
        INSERT INTO audit (task_id, old_state, new_state, old_token)
        VALUES (OLD.id, OLD.state, NEW.state, OLD.claim_token);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_task AFTER UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION audit_task();
";

#[tokio::test]
async fn overlapping_leaders_never_rescue_a_claim_twice_nor_reopen_a_done_task() {
    let db = testkit::database().await;
    sqlx::raw_sql(AUDIT).execute(&db.pool).await.unwrap();
    // Expired claims of a relay that died, old finished rows past retention,
    // recent finished rows, and fresh work.
    sqlx::raw_sql(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, state, attempts, claimed_by, claim_token, claim_expires_at)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'DEAD-' || g, 1, jsonb_build_object('order', jsonb_build_object('id', 'DEAD-' || g)),
                'running', 1, 'gone', gen_random_uuid(), now() - interval '1 minute'
         FROM generate_series(1, 300) g;
         INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, state, finished_at)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'OLD-' || g, 1, '{}', 'done', now() - interval '10 days' FROM generate_series(1, 400) g;
         INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, state, finished_at)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'RECENT-' || g, 1, '{}', 'done', now() - interval '1 hour' FROM generate_series(1, 100) g;
         INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'NEW-' || g, 1, jsonb_build_object('order', jsonb_build_object('id', 'NEW-' || g))
         FROM generate_series(1, 300) g;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Some deliveries outlast their claim, so rescues race with completions.
    let mock = mock_1c(Faults {
        slow_rate: 0.1,
        slow_ms: 400,
        ..Faults::default()
    })
    .await;
    let mut cfg = config();
    cfg.service.lease = Duration::from_millis(250);
    cfg.service.poll_interval = Duration::from_millis(50);
    cfg.service.rescue_interval = Duration::from_millis(20);
    cfg.service.retention = Duration::from_secs(86_400);
    cfg.service.retention_interval = Duration::from_millis(20);
    cfg.service.backlog_interval = Duration::from_millis(50);

    let relays: Vec<_> = (0..2)
        .map(|i| {
            let mut cfg = cfg.clone();
            cfg.service.relay_id = format!("leader-{i}");
            RunningRelay::start_with(&db.pool, mock.client.clone(), cfg, Leadership::always())
        })
        .collect();
    eventually(Duration::from_secs(30), || async {
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'running')",
        )
        .await
            == 0
    })
    .await;
    // Wait for the leader's backlog refresh to catch up with the drained outbox.
    let metrics = tokio::sync::Mutex::new(String::new());
    eventually(Duration::from_secs(5), || async {
        let res = relays[0]
            .relay
            .status_router()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let text = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec())
            .unwrap();
        let drained = text
            .lines()
            .any(|l| l == "orders_center_outbox_backlog_pending{destination=\"onec\"} 0");
        *metrics.lock().await = text;
        drained
    })
    .await;
    let metrics = metrics.into_inner();
    for r in relays {
        r.stop().await;
    }

    let rescued_twice = count(
        &db.pool,
        "SELECT count(*) FROM (SELECT task_id, old_token FROM audit
          WHERE old_state = 'running' AND new_state = 'pending'
          GROUP BY 1, 2 HAVING count(*) > 1) x",
    )
    .await;
    let rescues = count(
        &db.pool,
        "SELECT count(*) FROM audit WHERE old_state = 'running' AND new_state = 'pending'",
    )
    .await;
    let reopened = count(
        &db.pool,
        "SELECT count(*) FROM audit WHERE old_state = 'done'",
    )
    .await;
    assert_eq!(rescued_twice, 0);
    assert!(
        rescues >= 300,
        "the dead relay's 300 claims were rescued: {rescues}"
    );
    assert_eq!(reopened, 0, "a done task was reopened");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE aggregateid LIKE 'OLD-%'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE aggregateid LIKE 'RECENT-%' AND state = 'done'"
        )
        .await,
        100
    );
    assert_eq!(
        mock.state.stats().orders,
        600,
        "every dead and new order reached 1C"
    );
    assert_eq!(mock.state.stats().stale, 0);
    assert!(
        metrics
            .lines()
            .any(|l| l == "orders_center_relay_is_leader 1"),
        "{metrics}"
    );
}

/// A follower exposes `is_leader 0` and no backlog figures; a leader stuck
/// without renewals fails its health check.
#[tokio::test]
async fn followers_report_it_and_a_stuck_leader_fails_its_health_check() {
    let db = testkit::database().await;
    let mock = mock_1c(Faults::default()).await;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let follower = Arc::new(FixedLeader {
        leading: false,
        healthy: true,
        rx: rx.clone(),
    });
    let stuck = Arc::new(FixedLeader {
        leading: true,
        healthy: false,
        rx,
    });

    let f = RunningRelay::start_with(
        &db.pool,
        mock.client.clone(),
        config(),
        Leadership {
            leader: follower,
            election: None,
        },
    );
    let s = RunningRelay::start_with(
        &db.pool,
        mock.client.clone(),
        config(),
        Leadership {
            leader: stuck,
            election: None,
        },
    );
    let get = |relay: &relay::Relay, path: &'static str| {
        relay
            .status_router()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
    };
    let follower_metrics = get(&f.relay, "/metrics")
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let follower_health = get(&f.relay, "/healthz").await.unwrap().status();
    let stuck_health = get(&s.relay, "/healthz").await.unwrap().status();
    f.stop().await;
    s.stop().await;

    let text = String::from_utf8(follower_metrics.to_vec()).unwrap();
    assert!(
        text.lines().any(|l| l == "orders_center_relay_is_leader 0"),
        "{text}"
    );
    assert!(
        !text.contains("orders_center_outbox_backlog_pending"),
        "{text}"
    );
    assert_eq!(follower_health, 200);
    assert_eq!(stuck_health, 503);
}

struct FixedLeader {
    leading: bool,
    healthy: bool,
    rx: tokio::sync::watch::Receiver<bool>,
}

impl Leader for FixedLeader {
    fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.rx.clone()
    }
    fn is_leader(&self) -> bool {
        self.leading
    }
    fn healthy(&self) -> bool {
        self.healthy
    }
}

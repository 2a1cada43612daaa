//! The spec watch against a scripted API server: a pause stops one
//! destination's claims on a real relay and database, and a missing CRD or
//! resource leaves the flags in force with one warning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::{DeliveryPolicy, Destination};
use http::StatusCode;
use kube::Api;
use relay::{Leadership, Outlet, Relay, RelayConfig, ServiceConfig};
use relay_resource::SpecWatch;
use serde_json::json;
use store::Store;
use tokio_util::sync::CancellationToken;
use worker::Backoff;

use crate::support::{
    capture_warnings, client, controls, list, occurrences, protection, reply_events, resource,
    Switch, NAMESPACE, RESOURCES,
};

fn service() -> ServiceConfig {
    let minute = Duration::from_secs(60);
    ServiceConfig {
        relay_id: "relay-0".into(),
        batch_size: 50,
        claim_lanes: 1,
        lease: Duration::from_secs(30),
        max_attempts: 5,
        backoff: Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(100),
        },
        poll_interval: Duration::from_millis(100),
        rescue_interval: minute,
        retention: minute * 60,
        idempotency_key_ttl: minute * 60,
        inbox_retention: minute * 60,
        retention_interval: minute,
        backlog_interval: minute,
        in_doubt: Duration::from_secs(30),
    }
}

async fn queue(pool: &sqlx::PgPool, destination: &str, from: usize, n: usize) {
    for i in from..from + n {
        sqlx::query(
            "INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version, payload)
             VALUES (gen_random_uuid(), $1, 'order', $2, 'order.updated', 1, '{}')",
        )
        .bind(destination)
        .bind(format!("ORD-{i}"))
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_destination_stops_its_claims_alone_and_resuming_restarts_them() {
    let db = testkit::database().await;
    let (onec, erp) = (Arc::new(Switch::default()), Arc::new(Switch::default()));
    let outlet = |name: &str, sink: &Arc<Switch>| Outlet {
        destination: name.parse::<Destination>().unwrap(),
        policy: DeliveryPolicy::LatestWins,
        sink: sink.clone(),
        protection: protection(5, Duration::from_secs(10)),
    };
    let shutdown = CancellationToken::new();
    let relay = Relay::start(
        Store::new(db.pool.clone()),
        vec![outlet("onec", &onec), outlet("erp", &erp)],
        RelayConfig { service: service() },
        Leadership::always(),
        shutdown.clone(),
    );
    let (client, mut api) = client();
    let watch = SpecWatch::new(
        Api::namespaced(client, NAMESPACE),
        None,
        relay.controls().to_vec(),
    );
    let watching = tokio::spawn(watch.run(shutdown.clone()));
    let paused = |p: bool| {
        resource(
            "orders-center-onec",
            "onec",
            p,
            if p { 2 } else { 3 },
            json!({}),
        )
    };

    let listed = api.next().await;
    assert_eq!(listed.path, RESOURCES);
    assert!(!listed.is_watch());
    listed.reply(
        StatusCode::OK,
        &list(
            "1",
            &[resource("orders-center-onec", "onec", false, 1, json!({}))],
        ),
    );
    let held = api.next().await;
    assert!(held.is_watch(), "then it watches: {}", held.query);
    assert!(held.query.contains("resourceVersion=1"), "{}", held.query);

    queue(&db.pool, "onec", 0, 5).await;
    queue(&db.pool, "erp", 0, 5).await;
    wait_for("both deliver", || onec.count() == 5 && erp.count() == 5).await;

    // `kubectl patch … paused: true` arrives on the watch.
    reply_events(held.send, &[("MODIFIED", paused(true))]);
    let held = api.next().await;
    assert!(
        held.is_watch() && held.query.contains("resourceVersion=2"),
        "{}",
        held.query
    );
    let controls = relay.controls().to_vec();
    let took = wait_for("onec paused", || controls[0].paused()).await;
    println!("a pause applied {took:?} after the watch delivered it");
    assert!(!controls[1].paused(), "erp is not paused");

    queue(&db.pool, "onec", 5, 5).await;
    queue(&db.pool, "erp", 5, 5).await;
    wait_for("erp delivers", || erp.count() == 10).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(onec.count(), 5, "nothing of onec was claimed while paused");
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE destination = 'onec' AND state = 'pending'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending, 5);

    reply_events(held.send, &[("MODIFIED", paused(false))]);
    let took = wait_for("onec resumes", || onec.count() == 10).await;
    println!("resumed: the 5 held tasks delivered {took:?} after the watch event");
    assert!(took < Duration::from_secs(5), "{took:?}");

    shutdown.cancel();
    relay.stopped().await.unwrap();
    watching.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_the_crd_or_a_resource_the_flags_apply_with_one_warning() {
    let (captured, _logging) = capture_warnings();
    let flags = protection(5, Duration::from_secs(10));
    let (_, onec) = controls("onec", Arc::default(), flags);
    let (client, mut api) = client();
    let watch = SpecWatch::new(
        Api::namespaced(client, NAMESPACE),
        Some("app.kubernetes.io/instance=orders-center".into()),
        vec![onec.clone()],
    );
    let shutdown = CancellationToken::new();
    let watching = tokio::spawn(watch.run(shutdown.clone()));
    let not_found = testkit::kube_api::status(404, "NotFound");

    // No CRD: every list is a 404, retried with backoff.
    for _ in 0..3 {
        let call = api.next().await;
        assert_eq!(call.path, RESOURCES);
        assert!(
            call.query
                .contains("labelSelector=app.kubernetes.io%2Finstance%3Dorders-center"),
            "{}",
            call.query
        );
        call.reply(StatusCode::NOT_FOUND, &not_found);
    }
    assert_eq!(
        occurrences(&captured, "cannot watch OutboxRelay resources"),
        1
    );
    assert_eq!(onec.settings(), onec.flags());

    // The CRD arrives, without a resource for onec.
    let call = api.next().await;
    call.reply(
        StatusCode::OK,
        &list(
            "5",
            &[resource("orders-center-kafka", "kafka", true, 1, json!({}))],
        ),
    );
    let held = api.next().await;
    assert!(held.is_watch());
    reply_events(
        held.send,
        &[(
            "MODIFIED",
            resource("orders-center-kafka", "kafka", false, 2, json!({})),
        )],
    );
    let held = api.next().await;
    assert_eq!(
        occurrences(&captured, "no OutboxRelay resource names this destination"),
        1
    );
    assert_eq!(onec.settings(), onec.flags());
    assert!(!onec.paused());

    // One appears, paused: it applies; deleted: the flags again.
    let paused = resource("orders-center-onec", "onec", true, 1, json!({}));
    reply_events(held.send, &[("ADDED", paused.clone())]);
    let held = api.next().await;
    assert!(onec.paused());
    reply_events(held.send, &[("DELETED", paused)]);
    let _held = api.next().await;
    assert!(!onec.paused());
    assert_eq!(onec.settings(), onec.flags());
    assert_eq!(
        occurrences(&captured, "cannot watch OutboxRelay resources"),
        1
    );

    shutdown.cancel();
    watching.await.unwrap().unwrap();
}

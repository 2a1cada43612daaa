//! The status writer against a scripted API server: what the leader sends,
//! that a follower sends nothing, and the Events.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::SyncStats;
use http::{Method, StatusCode};
use kube::Api;
use relay_resource::spec_watch::Resources;
use relay_resource::status::Reporters;
use relay_resource::{OutboxRelay, Sources, StatusWriter};
use serde_json::{json, Value};
use sink::Message;
use testkit::kube_api::reply;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use worker::{BreakerState, MockLeader};

use crate::support::{
    client, controls, protection, resource, ApiServer, Switch, EVENTS, RESOURCES,
};

fn leader(leading: bool) -> (watch::Sender<bool>, Arc<MockLeader>) {
    let tx = watch::Sender::new(leading);
    let mut mock = MockLeader::new();
    let rx = tx.subscribe();
    mock.expect_subscribe().returning(move || rx.clone());
    mock.expect_is_leader().return_const(leading);
    (tx, Arc::new(mock))
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn recount(pending: i64, dead: i64) -> store::Backlog {
    store::Backlog {
        destinations: vec![SyncStats {
            destination: "onec".parse().unwrap(),
            pending,
            running: 1,
            dead,
            oldest_pending_age_seconds: 30.5,
            refreshed_at: at("2026-12-06T10:00:00Z"),
        }],
        cursors: Vec::new(),
        delivered: vec![("onec".into(), Some(at("2026-12-06T09:59:58Z")))],
    }
}

fn resources(items: &[Value]) -> Arc<Resources> {
    Arc::new(
        items
            .iter()
            .map(|r| {
                let r: OutboxRelay = serde_json::from_value(r.clone()).unwrap();
                (r.metadata.name.clone().unwrap(), r)
            })
            .collect(),
    )
}

struct Running {
    api: ApiServer,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
    backlog: watch::Sender<Option<Arc<store::Backlog>>>,
    _leading: watch::Sender<bool>,
    _resources: watch::Sender<Arc<Resources>>,
}

/// A writer for relay `relay-0` of destination `onec`, steered by resource
/// `orders-center-onec` (generation 3, last written by relay-9).
fn start(
    leading: bool,
    sink: Arc<Switch>,
    protection: relay::ProtectionConfig,
) -> (Running, Arc<relay::SinkGuard>) {
    let (client, api) = client();
    let (guard, onec) = controls("onec", sink, protection);
    let (leading, leader) = leader(leading);
    let backlog = watch::Sender::new(Some(Arc::new(recount(7, 2))));
    let previous = json!({"leader": "relay-9", "backlog": 3});
    let resources = watch::Sender::new(resources(&[resource(
        "orders-center-onec",
        "onec",
        false,
        3,
        previous,
    )]));
    let writer = StatusWriter::new(
        Api::namespaced(client, crate::support::NAMESPACE),
        Sources {
            identity: "relay-0".into(),
            controls: vec![onec],
            leader,
            backlog: backlog.subscribe(),
            resources: resources.subscribe(),
            store: None,
        },
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(writer.run(shutdown.clone()));
    let running = Running {
        api,
        shutdown,
        task,
        backlog,
        _leading: leading,
        _resources: resources,
    };
    (running, guard)
}

/// Answers a status write with the resource as stored.
fn stored(patch: crate::support::Call) {
    let stored = resource(
        "orders-center-onec",
        "onec",
        false,
        3,
        patch.body["status"].clone(),
    );
    patch.reply(StatusCode::OK, &stored);
}

fn closed_breaker() -> relay::ProtectionConfig {
    protection(5, Duration::from_secs(10))
}

#[tokio::test]
async fn the_leader_applies_the_status_under_its_field_manager_and_announces_itself() {
    let (mut r, _) = start(true, Arc::default(), closed_breaker());

    // A new leader first says so on the resource.
    let (event, send) = r.api.expect(Method::POST, EVENTS).await;
    assert_eq!(event["reason"], "LeaderElected");
    assert_eq!(event["type"], "Normal");
    assert_eq!(
        event["note"],
        "relay-0 leads the relays of onec (after relay-9)"
    );
    assert_eq!(event["regarding"]["kind"], "OutboxRelay");
    assert_eq!(event["regarding"]["name"], "orders-center-onec");
    assert_eq!(event["reportingController"], "orders-center-relay");
    assert_eq!(event["reportingInstance"], "relay-0");
    reply(send, StatusCode::CREATED, &event);

    // Then applies the status: server-side apply on the status subresource.
    let patch = r.api.next().await;
    assert_eq!(patch.method, Method::PATCH);
    assert_eq!(patch.path, format!("{RESOURCES}/orders-center-onec/status"));
    let mut query: Vec<&str> = patch.query.split('&').filter(|p| !p.is_empty()).collect();
    query.sort_unstable();
    assert_eq!(query, ["fieldManager=orders-center-relay", "force=true"]);
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    let status = &patch.body["status"];
    assert_eq!(patch.body["apiVersion"], "orders-center.io/v1alpha1");
    assert_eq!(patch.body["kind"], "OutboxRelay");
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(status["leader"], "relay-0");
    assert_eq!(status["breaker"], "Closed");
    assert_eq!(status["backlog"], 8, "pending and running");
    assert_eq!(status["dead"], 2);
    assert_eq!(status["oldestPending"], "2026-12-06T09:59:29Z");
    assert_eq!(status["lastDelivery"], "2026-12-06T09:59:58Z");
    assert_eq!(status["countedAt"], "2026-12-06T10:00:00Z");
    let conditions: Vec<(String, String, String)> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["observedGeneration"], 3);
            let s = |k: &str| c[k].as_str().unwrap().to_owned();
            (s("type"), s("status"), s("reason"))
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("Ready".into(), "True".into(), "Delivering".into()),
            ("Degraded".into(), "True".into(), "DeadLetters".into()),
            ("Paused".into(), "False".into(), "NotPaused".into()),
        ]
    );
    stored(patch);

    // Unchanged, it is not written again; a new recount is.
    r.api.silent_for(Duration::from_millis(2500)).await;
    r.backlog.send_replace(Some(Arc::new(recount(0, 0))));
    let patch = r.api.next().await;
    assert_eq!(patch.method, Method::PATCH);
    assert_eq!(patch.body["status"]["backlog"], 1);
    assert_eq!(patch.body["status"]["dead"], 0);
    assert_eq!(patch.body["status"]["conditions"][1]["status"], "False");
    stored(patch);

    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_follower_never_writes_the_status() {
    let (mut r, _) = start(false, Arc::default(), closed_breaker());
    r.api.silent_for(Duration::from_secs(3)).await;
    r.backlog.send_replace(Some(Arc::new(recount(1, 0))));
    r.api.silent_for(Duration::from_secs(2)).await;
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

fn message() -> Message {
    Message {
        event_id: uuid_like(),
        aggregate_type: "order".into(),
        aggregate_id: "ORD-1".into(),
        kind: "order.updated".into(),
        version: 1,
        payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        traceparent: None,
        signature: None,
    }
}

fn uuid_like() -> uuid::Uuid {
    uuid::Uuid::nil()
}

#[tokio::test]
async fn each_relay_records_its_breaker_opening_and_closing() {
    let sink = Arc::new(Switch::default());
    sink.failing.store(true, Ordering::SeqCst);
    // A follower: Events are not the leader's alone, each breaker is its
    // relay's own.
    let (mut r, guard) = start(
        false,
        sink.clone(),
        protection(1, Duration::from_millis(200)),
    );
    let cancel = CancellationToken::new();
    guard.deliver(&message(), &cancel).await;

    let (opened, send) = r.api.expect(Method::POST, EVENTS).await;
    assert_eq!(opened["reason"], "BreakerOpened");
    assert_eq!(opened["type"], "Warning");
    assert_eq!(opened["regarding"]["name"], "orders-center-onec");
    let note = opened["note"].as_str().unwrap();
    assert!(
        note.starts_with(
            "relay-0: the circuit breaker to onec opened after 1 consecutive failures"
        ),
        "{note}"
    );
    reply(send, StatusCode::CREATED, &opened);

    tokio::time::sleep(Duration::from_millis(250)).await;
    sink.failing.store(false, Ordering::SeqCst);
    guard.deliver(&message(), &cancel).await;
    let (closed, send) = r.api.expect(Method::POST, EVENTS).await;
    assert_eq!(closed["reason"], "BreakerClosed");
    assert_eq!(closed["type"], "Normal");
    reply(send, StatusCode::CREATED, &closed);
    assert_eq!(sink.count(), 1, "the probe went through");

    r.api.silent_for(Duration::from_millis(1500)).await;
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[test]
fn a_log_destination_reports_its_cursors_lag_who_holds_its_partitions_and_every_breaker() {
    let cursor =
        |partition: i16, owner: &str, events: i64, oldest: Option<&str>| store::log::CursorLag {
            destination: "kafka".into(),
            partition,
            owner: Some(owner.into()),
            delivered_at: Some(at("2026-12-06T09:59:50Z")),
            events,
            oldest_at: oldest.map(at),
        };
    let backlog = store::Backlog {
        destinations: vec![SyncStats {
            destination: "kafka".parse().unwrap(),
            pending: 12,
            running: 0,
            dead: 0,
            oldest_pending_age_seconds: 40.0,
            refreshed_at: at("2026-12-06T10:00:00Z"),
        }],
        cursors: vec![
            cursor(0, "relay-0", 5, Some("2026-12-06T09:59:20Z")),
            cursor(1, "relay-1", 7, Some("2026-12-06T09:59:45Z")),
            cursor(2, "relay-0", 0, None),
        ],
        delivered: Vec::new(),
    };
    let resource: OutboxRelay =
        serde_json::from_value(resource("orders-center-kafka", "kafka", true, 2, json!({})))
            .unwrap();
    let reporters = Reporters {
        leader: "relay-1",
        breakers: [
            ("relay-0", BreakerState::HalfOpen),
            ("relay-1", BreakerState::Closed),
            ("relay-2", BreakerState::Open),
        ]
        .into_iter()
        .map(|(r, s)| (r.to_owned(), s))
        .collect(),
    };
    let status = relay_resource::status::status_of(
        &resource,
        None,
        &"kafka".parse().unwrap(),
        &reporters,
        Some(&backlog),
        at("2026-12-06T10:00:01Z"),
    );
    assert_eq!(
        status.breaker.as_deref(),
        Some("Open"),
        "the worst of the relays'"
    );
    assert_eq!(status.breakers.len(), 3);
    let lag = status.cursor_lag.unwrap();
    assert_eq!(
        (lag.events, lag.seconds),
        (12, 40),
        "summed over partitions; the oldest's age"
    );
    assert_eq!(
        status.partitions.into_iter().collect::<Vec<_>>(),
        [("relay-0".to_owned(), 2), ("relay-1".to_owned(), 1)]
    );
    assert_eq!(
        status.last_delivery.as_deref(),
        Some("2026-12-06T09:59:50Z")
    );
    assert_eq!(
        status.oldest_pending.as_deref(),
        Some("2026-12-06T09:59:20Z")
    );
    let paused: Vec<_> = status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        paused,
        [
            ("Ready", "False", "Paused"),
            ("Degraded", "True", "BreakerOpen"),
            ("Paused", "True", "PausedBySpec"),
        ]
    );
    assert_eq!(
        status.conditions[1].message,
        "the circuit breaker is Open on relay-0, relay-2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_open_breaker_reaches_the_leaders_status_through_the_database() {
    let db = testkit::database().await;
    let store = store::Store::new(db.pool.clone());
    let shared = watch::Sender::new(resources(&[resource(
        "orders-center-onec",
        "onec",
        false,
        1,
        json!({}),
    )]));
    let writer = |identity: &str, leading: bool, controls: Arc<relay::Controls>| {
        let (client, api) = client();
        let (leading, leader) = leader(leading);
        let writer = StatusWriter::new(
            Api::namespaced(client, crate::support::NAMESPACE),
            Sources {
                identity: identity.into(),
                controls: vec![controls],
                leader,
                backlog: watch::Sender::new(None).subscribe(),
                resources: shared.subscribe(),
                store: Some(store.clone()),
            },
        );
        (writer, api, leading)
    };
    let failing = Arc::new(Switch::default());
    failing.failing.store(true, Ordering::SeqCst);
    let (follower_guard, follower_controls) =
        controls("onec", failing, protection(1, Duration::from_secs(60)));
    let (_, leader_controls) = controls("onec", Arc::default(), closed_breaker());
    let (follower, mut follower_api, _f) = writer("relay-1", false, follower_controls);
    let (leader, mut leader_api, _l) = writer("relay-0", true, leader_controls);
    let shutdown = CancellationToken::new();
    let tasks = [
        tokio::spawn(follower.run(shutdown.clone())),
        tokio::spawn(leader.run(shutdown.clone())),
    ];
    // The follower's Events are answered; it never writes a status.
    let follower_calls = tokio::spawn(async move {
        loop {
            let call = follower_api.next().await;
            assert_eq!(call.path, EVENTS, "a follower only records Events");
            let body = call.body.clone();
            call.reply(StatusCode::CREATED, &body);
        }
    });

    // Both relays report Closed; then the follower's breaker opens.
    let mut opened = false;
    let status = loop {
        let call = leader_api.next().await;
        if call.method == Method::POST {
            let body = call.body.clone();
            call.reply(StatusCode::CREATED, &body);
            continue;
        }
        let status = call.body["status"].clone();
        let stored = resource("orders-center-onec", "onec", false, 1, status.clone());
        call.reply(StatusCode::OK, &stored);
        if status["breakers"] == json!({"relay-0": "Closed", "relay-1": "Closed"}) && !opened {
            assert_eq!(status["breaker"], "Closed");
            follower_guard
                .deliver(&message(), &CancellationToken::new())
                .await;
            opened = true;
        }
        if status["breaker"] == "Open" {
            break status;
        }
    };
    assert_eq!(
        status["breakers"],
        json!({"relay-0": "Closed", "relay-1": "Open"})
    );
    assert_eq!(status["leader"], "relay-0");
    let degraded = &status["conditions"][1];
    assert_eq!(degraded["status"], "True");
    assert_eq!(
        degraded["message"],
        "the circuit breaker is Open on relay-1"
    );
    assert_eq!(status["conditions"][0]["status"], "False", "not Ready");

    shutdown.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    follower_calls.abort();
}

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
use relay_resource::{OutboxRelay, Sources, StatusWriter};
use serde_json::{json, Value};
use sink::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use worker::MockLeader;

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
    let event = r.api.next().await;
    assert_eq!(
        (event.method.clone(), event.path.as_str()),
        (Method::POST, EVENTS)
    );
    assert_eq!(event.body["reason"], "LeaderElected");
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(
        event.body["note"],
        "relay-0 leads the relays of onec (after relay-9)"
    );
    assert_eq!(event.body["regarding"]["kind"], "OutboxRelay");
    assert_eq!(event.body["regarding"]["name"], "orders-center-onec");
    assert_eq!(event.body["reportingController"], "orders-center-relay");
    assert_eq!(event.body["reportingInstance"], "relay-0");
    let body = event.body.clone();
    event.reply(StatusCode::CREATED, &body);

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

    let opened = r.api.next().await;
    assert_eq!(
        (opened.method.clone(), opened.path.as_str()),
        (Method::POST, EVENTS)
    );
    assert_eq!(opened.body["reason"], "BreakerOpened");
    assert_eq!(opened.body["type"], "Warning");
    assert_eq!(opened.body["regarding"]["name"], "orders-center-onec");
    let note = opened.body["note"].as_str().unwrap();
    assert!(
        note.starts_with(
            "relay-0: the circuit breaker to onec opened after 1 consecutive failures"
        ),
        "{note}"
    );
    let body = opened.body.clone();
    opened.reply(StatusCode::CREATED, &body);

    tokio::time::sleep(Duration::from_millis(250)).await;
    sink.failing.store(false, Ordering::SeqCst);
    guard.deliver(&message(), &cancel).await;
    let closed = r.api.next().await;
    assert_eq!(closed.body["reason"], "BreakerClosed");
    assert_eq!(closed.body["type"], "Normal");
    let body = closed.body.clone();
    closed.reply(StatusCode::CREATED, &body);
    assert_eq!(sink.count(), 1, "the probe went through");

    r.api.silent_for(Duration::from_millis(1500)).await;
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[test]
fn a_log_destination_reports_its_cursors_lag_and_who_holds_its_partitions() {
    let (_, kafka) = controls("kafka", Arc::default(), closed_breaker());
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
    let status = relay_resource::status::status_of(
        &resource,
        None,
        &kafka,
        "relay-1",
        Some(&backlog),
        at("2026-12-06T10:00:01Z"),
    );
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
            ("Degraded", "False", "Healthy"),
            ("Paused", "True", "PausedBySpec"),
        ]
    );
}

//! The sinks and consumers against a real Kafka and a real RabbitMQ, each
//! started once for this binary; every test has its own topics, exchanges
//! and queues, and its own database.

mod ingest;
mod kafka;
mod poison;
mod rabbitmq;

use std::time::Duration;

use chrono::Utc;
use domain::{OrderEvent, OrderNotice};
use inbox::journal::Journal;
use inbox::{ConsumerMetrics, Inbox};
use sink::{Message, Sink};
use sqlx::PgPool;
use uuid::Uuid;

/// The notices of `orders` orders with `versions` versions each, in write
/// order per order.
fn notices(orders: usize, versions: i64) -> Vec<OrderNotice> {
    let mut all = Vec::new();
    for v in 1..=versions {
        for o in 0..orders {
            all.push(OrderNotice {
                idempotent_key: Uuid::now_v7(),
                order_id: format!("ORD-{o}"),
                version: v,
                status: "new".into(),
                kind: if v == 1 {
                    OrderEvent::Created
                } else {
                    OrderEvent::Updated
                },
                previous_status: None,
                occurred_at: Utc::now(),
            });
        }
    }
    all
}

fn message(n: &OrderNotice) -> Message {
    Message {
        event_id: n.idempotent_key,
        aggregate_type: "order".into(),
        aggregate_id: n.order_id.clone(),
        kind: n.kind.as_str().into(),
        version: n.version,
        payload: serde_json::value::to_raw_value(n).unwrap(),
        traceparent: None,
        signature: None,
    }
}

/// Sends every notice through `sink`, one order's in order, many orders at
/// once, as the delivery engine does.
async fn publish_all(sink: &dyn Sink, all: &[OrderNotice]) {
    let mut by_order: std::collections::BTreeMap<&str, Vec<&OrderNotice>> = Default::default();
    for n in all {
        by_order.entry(&n.order_id).or_default().push(n);
    }
    let lanes = by_order.into_values().map(|lane| async move {
        for n in lane {
            sink.deliver(&message(n))
                .await
                .unwrap_or_else(|f| panic!("{} v{} not delivered: {f}", n.order_id, n.version));
        }
    });
    futures::future::join_all(lanes).await;
}

fn journal(pool: &PgPool) -> (Inbox<Journal>, ConsumerMetrics) {
    let metrics = ConsumerMetrics::unregistered();
    let inbox = Inbox::new(
        pool.clone(),
        "journal",
        Journal::new("journal"),
        metrics.clone(),
    );
    (inbox, metrics)
}

/// Waits until the journal holds `n` rows.
async fn journal_reaches(pool: &PgPool, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM order_journal")
            .fetch_one(pool)
            .await
            .unwrap();
        if rows >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the journal has {rows} of {n} rows after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every notice is in the journal exactly once, and each order's versions
/// were applied in ascending order.
async fn assert_each_once_in_order(pool: &PgPool, all: &[OrderNotice]) {
    let rows: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT event_id, order_id, version FROM order_journal ORDER BY seq")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), all.len(), "one journal row per event");
    let ids: std::collections::HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
    assert_eq!(ids.len(), all.len(), "no event applied twice");
    assert!(all.iter().all(|n| ids.contains(&n.idempotent_key)));
    let mut last: std::collections::HashMap<&str, i64> = Default::default();
    for (_, order, version) in &rows {
        let before = last.insert(order, *version).unwrap_or(0);
        assert!(
            *version > before,
            "{order}: v{version} applied after v{before}"
        );
    }
}

/// A running journal consumer: its metrics, its stop, its task.
type Running = (
    ConsumerMetrics,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
);

/// 600 events and a redelivered copy of one go through `sink`; the journal
/// started by `start` applies each once, in order per order, and counts the
/// copy as a duplicate.
async fn every_event_once_in_order(
    sink: &dyn Sink,
    pool: &PgPool,
    start: impl FnOnce() -> Running,
) {
    let all = notices(200, 3);
    publish_all(sink, &all).await;
    sink.deliver(&message(&all[0])).await.unwrap();

    let (metrics, cancel, task) = start();
    journal_reaches(pool, all.len() as i64).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metrics.count("journal", "duplicate") < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the duplicate is never seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    task.await.unwrap();
    assert_each_once_in_order(pool, &all).await;
    assert_eq!(metrics.count("journal", "applied"), all.len() as u64);
}

/// The same 600 events sent as batches of 100 (each order's versions in
/// write order): every outcome is a success, and the journal applies each
/// once, in order per order.
async fn batches_reach_the_journal_once_and_in_order(
    sink: &dyn Sink,
    pool: &PgPool,
    start: impl FnOnce() -> Running,
) {
    let all = notices(200, 3);
    let messages: Vec<Message> = all.iter().map(message).collect();
    for batch in messages.chunks(100) {
        let outcomes = sink.deliver_batch(batch).await;
        assert_eq!(outcomes.len(), batch.len(), "one outcome per message");
        for (m, outcome) in batch.iter().zip(&outcomes) {
            if let Err(f) = outcome {
                panic!("{} v{} not delivered: {f}", m.aggregate_id, m.version);
            }
        }
    }
    let (_metrics, cancel, task) = start();
    journal_reaches(pool, all.len() as i64).await;
    cancel.cancel();
    task.await.unwrap();
    assert_each_once_in_order(pool, &all).await;
}

/// The bodies a test feeds raw to a consumer: one of each kind of poison,
/// between two good notices.
fn poison_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let mut bad_version = serde_json::to_value(&notices(1, 1)[0]).unwrap();
    bad_version["version"] = 0.into();
    let mut unknown = serde_json::to_value(&notices(1, 1)[0]).unwrap();
    unknown["type"] = "order.exploded".into();
    vec![
        ("bad_json", b"{not json".to_vec()),
        ("unknown_type", serde_json::to_vec(&unknown).unwrap()),
        ("invalid", serde_json::to_vec(&bad_version).unwrap()),
    ]
}

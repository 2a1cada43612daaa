//! What a saving transaction queues for delivery: 1C's snapshots as outbox
//! rows (claimed and completed by the relay, `tasks.rs`), and every event
//! stream's events appended to the log (`log.rs`).

use chrono::{DateTime, Utc};
use domain::{Destination, OrderEvent, OrderFull, OrderId, OrderNotice, Routes, ORDER_AGGREGATE};
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::log::Append;
use crate::{Error, Result};

/// The channel the saving transaction notifies and the relays listen on.
pub const NOTIFY_CHANNEL: &str = "outbox";

/// One outbox row, or log event, just written.
pub(crate) struct Enqueued {
    /// The outbox row's id; `None` for an event appended to the log.
    pub id: Option<i64>,
    pub order: String,
    pub destination: Destination,
    pub event: OrderEvent,
    pub created_at: DateTime<Utc>,
}

/// What a save is about: the order version, its snapshot and the status it
/// had before (`None` when created).
pub(crate) struct SaveEvents<'a> {
    pub order: &'a OrderId,
    pub version: i64,
    pub snapshot: &'a OrderFull,
    pub previous_status: Option<&'a str>,
    pub traceparent: Option<&'a str>,
}

/// Queues the events of `saves` for their routed destinations, one
/// statement for 1C's rows and one for the log, and wakes the relays. Runs
/// inside the saving transaction: the rows exist exactly when the save
/// commits, and PostgreSQL delivers the notification only on commit. Every
/// destination's copy of one event shares its event id.
pub(crate) async fn enqueue(
    conn: &mut PgConnection,
    routes: &Routes,
    saves: &[SaveEvents<'_>],
) -> Result<Vec<Enqueued>> {
    let mut logged = Vec::new();
    let mut appends = Vec::new();
    let occurred_at = Utc::now();
    let (mut orders, mut versions, mut traceparents) = (Vec::new(), Vec::new(), Vec::new());
    let (mut destinations, mut types, mut event_ids, mut payloads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for save in saves {
        let status = &save.snapshot.order.status;
        for event in OrderEvent::of_save(save.previous_status, status) {
            let to = routes.destinations(event);
            if to.is_empty() {
                continue;
            }
            let event_id = Uuid::now_v7();
            let notice = OrderNotice {
                idempotent_key: event_id,
                order_id: save.order.as_str().to_owned(),
                version: save.version,
                status: status.clone(),
                kind: event,
                occurred_at,
            };
            for d in to {
                if !d.takes_snapshots() {
                    let payload = serde_json::to_value(&notice).map_err(|e| {
                        Error::Invariant(format!("an event does not serialize: {e}"))
                    })?;
                    appends.push((d, save, event, event_id, payload));
                    continue;
                }
                let payload = if event == OrderEvent::StatusChanged {
                    Ok(serde_json::json!({"from": save.previous_status, "to": status}))
                } else {
                    serde_json::to_value(save.snapshot)
                }
                .map_err(|e| Error::Invariant(format!("an event does not serialize: {e}")))?;
                orders.push(save.order.as_str());
                versions.push(save.version);
                traceparents.push(save.traceparent);
                destinations.push(d.as_str());
                types.push(event.as_str());
                event_ids.push(event_id);
                payloads.push(payload);
            }
        }
    }
    if !appends.is_empty() {
        let batch: Vec<Append<'_>> = appends
            .iter()
            .map(|(d, save, event, event_id, payload)| Append {
                destination: d,
                stream: ORDER_AGGREGATE,
                key: save.order.as_str(),
                kind: event.as_str(),
                version: save.version,
                event_id: *event_id,
                payload,
                traceparent: save.traceparent,
            })
            .collect();
        crate::log::append(&mut *conn, &batch).await?;
        let now = Utc::now();
        logged.extend(appends.iter().map(|(d, save, event, ..)| Enqueued {
            id: None,
            order: save.order.as_str().to_owned(),
            destination: (*d).clone(),
            event: *event,
            created_at: now,
        }));
    }
    if destinations.is_empty() {
        if !logged.is_empty() {
            notify(conn).await?;
        }
        return Ok(logged);
    }
    let rows: Vec<(i64, String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version,
                             payload, traceparent)
         SELECT e.event_id, e.destination, $1, e.aggregateid, e.type, e.version, e.payload,
                e.traceparent
         FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                     $7::jsonb[], $8::text[])
              AS e(event_id, destination, aggregateid, type, version, payload, traceparent)
         RETURNING id, aggregateid, destination, type, created_at",
    )
    .bind(ORDER_AGGREGATE)
    .bind(event_ids)
    .bind(destinations)
    .bind(orders)
    .bind(types)
    .bind(versions)
    .bind(payloads.into_iter().map(Json).collect::<Vec<_>>())
    .bind(traceparents)
    .fetch_all(&mut *conn)
    .await?;
    notify(conn).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, order, destination, event, created_at)| {
            Some(Enqueued {
                id: Some(id),
                order,
                destination: destination.parse().ok()?,
                event: OrderEvent::parse(&event)?,
                created_at,
            })
        })
        .chain(logged)
        .collect())
}

/// One event for one destination, written by a caller other than an order
/// save: the saga's commands and outcomes, and the services' answers.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// Its id, the consumers' inbox key.
    pub event_id: Uuid,
    /// Who gets it: a broker (`kafka`, `rabbitmq`) or a local consumer.
    pub destination: Destination,
    /// Debezium's `aggregatetype`: the topic.
    pub aggregate_type: &'static str,
    /// Debezium's `aggregateid`: the key whose events keep their order.
    pub aggregate_id: String,
    /// The event name.
    pub kind: &'static str,
    /// The aggregate's version it belongs to.
    pub version: i64,
    /// The body.
    pub payload: serde_json::Value,
}

/// Appends `events`, all bound for event streams, to the log in the
/// caller's transaction and wakes the relays on commit.
pub async fn write_events(conn: &mut PgConnection, events: &[OutboxEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    if let Some(e) = events.iter().find(|e| e.destination.takes_snapshots()) {
        return Err(Error::Invariant(format!(
            "{} {} is bound for {}, which takes order snapshots, not events",
            e.kind, e.aggregate_id, e.destination
        )));
    }
    let batch: Vec<Append<'_>> = events
        .iter()
        .map(|e| Append {
            destination: &e.destination,
            stream: e.aggregate_type,
            key: &e.aggregate_id,
            kind: e.kind,
            version: e.version,
            event_id: e.event_id,
            payload: &e.payload,
            traceparent: None,
        })
        .collect();
    crate::log::append(&mut *conn, &batch).await?;
    notify(conn).await
}

/// Wakes the relays when the current transaction commits.
pub(crate) async fn notify(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

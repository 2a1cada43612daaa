//! What a saving transaction queues for delivery: 1C's snapshots as outbox
//! rows (claimed and completed by the relay, `tasks.rs`), and every event
//! stream's events appended to the log (`log.rs`).

use std::collections::BTreeMap;

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
    /// The outbox row's id (new, or the pending row the save coalesced
    /// into); `None` for an event appended to the log.
    pub id: Option<i64>,
    pub order: String,
    pub destination: Destination,
    /// When the row or event was last written, and the row's attempts and
    /// last error so far (a row a save coalesced into keeps them).
    pub updated_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: Option<String>,
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

/// Queues the one event of each of `saves` for its routed destinations,
/// one statement for 1C's rows and one for the log, and wakes the relays.
/// Runs inside the saving transaction: the rows exist exactly when the save
/// commits, and PostgreSQL delivers the notification only on commit. Every
/// destination's copy of one event shares its event id.
pub(crate) async fn enqueue(
    conn: &mut PgConnection,
    routes: &Routes,
    saves: &[SaveEvents<'_>],
) -> Result<Vec<Enqueued>> {
    let mut appends = Vec::new();
    // 1C's snapshots by (destination, order): latest wins, so of one
    // order's versions in this transaction only the newest is queued.
    let mut snapshots: BTreeMap<(&str, &str), Snapshot<'_>> = BTreeMap::new();
    let occurred_at = Utc::now();
    let invariant =
        |e: serde_json::Error| Error::Invariant(format!("an event does not serialize: {e}"));
    for save in saves {
        let status = &save.snapshot.order.status;
        let event = OrderEvent::of_save(save.previous_status);
        let changed_from = save.previous_status.filter(|before| before != status);
        let to = routes.of_save(event, changed_from.is_some());
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
            previous_status: changed_from.map(str::to_owned),
            occurred_at,
        };
        for d in to {
            if !d.takes_snapshots() {
                let payload = serde_json::to_value(&notice).map_err(invariant)?;
                appends.push((d, save, event, event_id, payload));
                continue;
            }
            let key = (d.as_str(), save.order.as_str());
            if snapshots
                .get(&key)
                .is_some_and(|s| s.save.version > save.version)
            {
                continue;
            }
            let payload = serde_json::to_value(save.snapshot).map_err(invariant)?;
            snapshots.insert(
                key,
                Snapshot {
                    save,
                    event,
                    event_id,
                    payload,
                },
            );
        }
    }
    let mut queued = Vec::with_capacity(appends.len() + snapshots.len());
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
        queued.extend(appends.iter().map(|(d, save, ..)| Enqueued {
            id: None,
            order: save.order.as_str().to_owned(),
            destination: (*d).clone(),
            updated_at: now,
            attempts: 0,
            last_error: None,
        }));
    }
    if !snapshots.is_empty() {
        queued.extend(queue_snapshots(conn, snapshots).await?);
    }
    if !queued.is_empty() {
        notify(conn).await?;
    }
    Ok(queued)
}

/// A 1C row as the save left it.
#[derive(sqlx::FromRow)]
struct QueuedRow {
    id: i64,
    aggregateid: String,
    destination: String,
    updated_at: DateTime<Utc>,
    attempts: i32,
    last_error: Option<String>,
}

/// A 1C snapshot to queue.
struct Snapshot<'a> {
    save: &'a SaveEvents<'a>,
    event: OrderEvent,
    event_id: Uuid,
    payload: serde_json::Value,
}

/// Queues 1C's snapshots, at most one pending row per order: a save
/// coalesces into its order's pending row (version, payload, event id and
/// trace replaced in place), and adds a row only when there is none that
/// may take it. A row that runs was claimed: its attempt is under way, so
/// the new version needs a row of its own. So does a row whose attempt is
/// in doubt: 1C may still apply that version, and the claim must see two
/// versions to hold the newer one back until the older can no longer
/// land. A claim racing the save either locked the row first (the save
/// waits, sees it running on recheck, and adds a row) or finds it already
/// rewritten, and sends the newer version.
///
/// An order's first version has no row to coalesce into and is inserted
/// without looking: the look-up is planned once per connection, and a plan
/// made while the outbox was nearly empty scans it whole, which cut the
/// API's creates to a third as the table grew (bench scenario 4).
async fn queue_snapshots(
    conn: &mut PgConnection,
    snapshots: BTreeMap<(&str, &str), Snapshot<'_>>,
) -> Result<Vec<Enqueued>> {
    let (created, updated): (Vec<_>, Vec<_>) = snapshots
        .into_iter()
        .partition(|(_, s)| s.save.previous_status.is_none());
    let mut queued = Vec::new();
    for (sql, group) in [(INSERT_SNAPSHOTS, created), (COALESCE_SNAPSHOTS, updated)] {
        if group.is_empty() {
            continue;
        }
        let (mut destinations, mut orders, mut types, mut versions) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut event_ids, mut payloads, mut traceparents) = (Vec::new(), Vec::new(), Vec::new());
        for ((destination, order), s) in group {
            destinations.push(destination);
            orders.push(order);
            types.push(s.event.as_str());
            versions.push(s.save.version);
            event_ids.push(s.event_id);
            payloads.push(Json(s.payload));
            traceparents.push(s.save.traceparent);
        }
        let rows: Vec<QueuedRow> = sqlx::query_as(sql)
            .bind(ORDER_AGGREGATE)
            .bind(event_ids)
            .bind(destinations)
            .bind(orders)
            .bind(types)
            .bind(versions)
            .bind(payloads)
            .bind(traceparents)
            .fetch_all(&mut *conn)
            .await?;
        queued.extend(rows.into_iter().filter_map(|r| {
            Some(Enqueued {
                id: Some(r.id),
                order: r.aggregateid,
                destination: r.destination.parse().ok()?,
                updated_at: r.updated_at,
                attempts: r.attempts,
                last_error: r.last_error,
            })
        }));
    }
    Ok(queued)
}

/// The snapshots `$2`..`$8` (event id, destination, order, type, version,
/// payload, traceparent) of aggregate type `$1`, as new rows.
const INSERT_SNAPSHOTS: &str = "
    INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type, version,
                        payload, traceparent)
    SELECT e.event_id, e.destination, $1, e.aggregateid, e.type, e.version, e.payload,
           e.traceparent
    FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::jsonb[],
                $8::text[])
         AS e(event_id, destination, aggregateid, type, version, payload, traceparent)
    RETURNING id, aggregateid, destination, updated_at, attempts, last_error";

/// The same, each coalesced into its order's pending row where one may take
/// it, and as a new row where none may.
const COALESCE_SNAPSHOTS: &str = "
    WITH e AS (
        SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                             $7::jsonb[], $8::text[])
            AS e(event_id, destination, aggregateid, type, version, payload, traceparent)
    ),
    -- Each order's newest pending row, read from its lane (the lane index).
    -- `state` stays out of the WHERE: with it, the planner may take the
    -- partial index of pending rows and filter every pending row of the
    -- destination by key (48 ms a save at 16,000 pending rows).
    target AS (
        SELECT e.*, p.id AS row_id FROM e
        CROSS JOIN LATERAL (
            SELECT max(o.id) FILTER (WHERE o.state = 'pending') AS id
            FROM outbox o
            WHERE o.aggregateid = e.aggregateid AND o.destination = e.destination
        ) p
    ),
    coalesced AS (
        UPDATE outbox t
        SET event_id = e.event_id, type = e.type, version = e.version,
            payload = e.payload, traceparent = e.traceparent, updated_at = now()
        FROM target e
        WHERE t.id = e.row_id
          AND t.state = 'pending' AND t.version < e.version
          AND (t.in_doubt_until IS NULL OR t.in_doubt_until <= now())
        RETURNING t.id, t.aggregateid, t.destination, t.updated_at, t.attempts, t.last_error
    ),
    added AS (
        INSERT INTO outbox (event_id, destination, aggregatetype, aggregateid, type,
                            version, payload, traceparent)
        SELECT e.event_id, e.destination, $1, e.aggregateid, e.type, e.version,
               e.payload, e.traceparent
        FROM e
        WHERE NOT EXISTS (SELECT 1 FROM coalesced c
                          WHERE c.aggregateid = e.aggregateid
                            AND c.destination = e.destination)
        RETURNING id, aggregateid, destination, updated_at, attempts, last_error
    )
    SELECT * FROM coalesced UNION ALL SELECT * FROM added";

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

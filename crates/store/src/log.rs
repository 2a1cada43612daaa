//! The event-stream log (`migrations/20261205000014_event_log.sql`): events
//! appended by the saving transaction, read per (destination, partition)
//! between snapshots, and space reclaimed by truncating ring segments.
//!
//! **The fence.** Positions come from a sequence and commit out of order, so
//! a cursor is not a position: it is a snapshot (`done`) whose visible
//! events are all delivered. A read opens a window, the current snapshot,
//! and delivers the events visible in it and not in `done`, in position
//! order; when the window is through, it becomes `done`. An event whose
//! transaction was running when a window opened is in a later window, never
//! skipped. Within a window, one key's events are in position order, which
//! is their commit order, because the writers of one key are serialized by
//! that key's row lock and draw their positions after taking it.
//!
//! **Sharing the work.** A relay claims a partition by locking its cursor
//! row (`FOR UPDATE SKIP LOCKED`) in a transaction it holds while it
//! delivers; the lock goes with the relay's connection, so a dead relay's
//! partitions are free at once. Reads go through the pool, outside that
//! transaction, so they hold no lock a rotation waits for.
//!
//! **Rotation.** A segment every cursor has passed, and that the sequence
//! is not writing into, is truncated under an exclusive lock taken with a
//! timeout: an insert still running into it makes the rotation wait for a
//! later turn. No log row is ever updated or deleted.

use chrono::{DateTime, Utc};
use domain::Destination;
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::{Result, Store};

/// A snapshot in which nothing is visible: where a new cursor starts, so
/// it reads every event already in the log.
const NOTHING_DELIVERED: &str = "3:3:";

/// The log's fixed shape, from `log_config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogShape {
    /// Partitions per destination; a key's partition depends on it.
    pub partitions: u16,
    /// Positions per segment.
    pub segment_size: i64,
    /// Segments in the ring.
    pub segments: i16,
    /// This log's identity, unique per database: what tells its Kafka
    /// transactional ids from those of another database's log.
    pub id: Uuid,
}

/// The ordering key's hash: FNV-1a (64 bit) of `stream`, a newline and
/// `key`, shifted right by one so it is a positive `bigint`. The stream is
/// part of the key, so one stream's undeliverable events never hold up
/// another stream's.
pub fn key_hash(stream: &str, key: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in stream.bytes().chain([b'\n']).chain(key.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::try_from(hash >> 1).expect("63 bits fit")
}

/// The partition of `key` in `stream`: its [`key_hash`] modulo
/// `partitions`, as [`append`] computes it from `log_config`.
pub fn partition_of(partitions: u16, stream: &str, key: &str) -> i16 {
    // Below 1024 by the table's check, so it fits.
    i16::try_from(key_hash(stream, key) % i64::from(partitions.max(1))).unwrap_or(0)
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct Append<'a> {
    /// Where it goes.
    pub destination: &'a Destination,
    /// Debezium's `aggregatetype`: the topic or exchange.
    pub stream: &'a str,
    /// Debezium's `aggregateid`: the ordering key.
    pub key: &'a str,
    /// The event, e.g. `order.updated`.
    pub kind: &'a str,
    /// The aggregate's version.
    pub version: i64,
    /// The event's id, the same on every destination's copy.
    pub event_id: Uuid,
    /// The payload.
    pub payload: &'a serde_json::Value,
    /// W3C trace context to pass on.
    pub traceparent: Option<&'a str>,
}

impl CursorLag {
    /// The age of the oldest event not passed, in seconds; 0 when none.
    pub fn seconds(&self) -> f64 {
        self.oldest_at.map_or(0.0, |at| {
            (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
        })
    }
}

/// One event read from the log.
#[derive(Debug, Clone)]
pub struct LogEvent {
    /// Its place in the log.
    pub position: i64,
    /// The event's id.
    pub event_id: Uuid,
    /// The topic or exchange.
    pub stream: String,
    /// The ordering key.
    pub key: String,
    /// The event.
    pub kind: String,
    /// The aggregate's version.
    pub version: i64,
    /// The payload as committed, as JSON text.
    pub payload: Box<serde_json::value::RawValue>,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// When it was appended.
    pub created_at: DateTime<Utc>,
}

/// Appends `events` in the caller's transaction: they become readable when
/// it commits, at positions in the order given, each in the partition
/// [`partition_of`] names for `log_config`'s partition count.
pub async fn append(conn: &mut PgConnection, events: &[Append<'_>]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let hashes: Vec<i64> = events.iter().map(|e| key_hash(e.stream, e.key)).collect();
    sqlx::query(
        "INSERT INTO event_log (position, segment, destination, partition, event_id, aggregatetype,
                                aggregateid, type, version, payload, traceparent)
         SELECT e.p, ((e.p / c.segment_size) % c.segments)::smallint, e.destination,
                (e.hash % c.partitions)::smallint, e.event_id, e.aggregatetype, e.aggregateid,
                e.type, e.version, e.payload, e.traceparent
         FROM (SELECT nextval('event_log_position') AS p, u.*
               FROM unnest($1::text[], $2::int8[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                           $7::int8[], $8::jsonb[], $9::text[]) WITH ORDINALITY
                    AS u(destination, hash, event_id, aggregatetype, aggregateid, type, version,
                         payload, traceparent, n)
               ORDER BY u.n) e
         CROSS JOIN log_config c",
    )
    .bind(
        events
            .iter()
            .map(|e| e.destination.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(hashes)
    .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.stream).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.key).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.version).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.payload).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.traceparent).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// A partition claimed by this relay: its cursor row stays locked until
/// [`advance`](Self::advance) or [`release`](Self::release), or until the
/// relay's connection drops.
pub struct Claimed {
    tx: Transaction<'static, Postgres>,
    pool: sqlx::PgPool,
    destination: String,
    partition: i16,
    done: String,
    window: Option<String>,
    position: i64,
    /// Something was read since the claim: the cursor row has to move.
    moved: bool,
    /// The window is through once what was read is passed.
    complete: bool,
}

/// How far one cursor is behind: what `orders-center tasks cursors` lists
/// and the per-partition metrics show.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CursorLag {
    /// The destination.
    pub destination: String,
    /// The partition.
    pub partition: i16,
    /// The relay that claimed it last.
    pub owner: Option<String>,
    /// When it last moved past a delivery.
    pub delivered_at: Option<DateTime<Utc>>,
    /// Committed events it has not passed yet.
    pub events: i64,
    /// When the oldest of them was appended; `None` when none.
    pub oldest_at: Option<DateTime<Utc>>,
}

/// The events [`Claimed::read`] found.
#[derive(Debug)]
pub struct Run {
    /// In commit order per key, at most the limit asked for.
    pub events: Vec<LogEvent>,
    /// Nothing of the window is left after these.
    pub complete: bool,
}

#[derive(sqlx::FromRow)]
struct LagRow {
    destination: String,
    partition: i16,
    owner: Option<String>,
    delivered_at: Option<DateTime<Utc>>,
    events: i64,
    oldest_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    position: i64,
    event_id: Uuid,
    aggregatetype: String,
    aggregateid: String,
    r#type: String,
    version: i64,
    payload: String,
    traceparent: Option<String>,
    created_at: DateTime<Utc>,
}

impl Store {
    /// The log's shape.
    pub async fn log_shape(&self) -> Result<LogShape> {
        let (partitions, segment_size, segments, id): (i16, i64, i16, Uuid) =
            sqlx::query_as("SELECT partitions, segment_size, segments, log_id FROM log_config")
                .fetch_one(self.pool())
                .await?;
        Ok(LogShape {
            partitions: u16::try_from(partitions).unwrap_or(1),
            segment_size,
            segments,
            id,
        })
    }

    /// Makes the cursor rows of `destination`, one per partition, starting
    /// before the first event; existing ones are kept.
    pub async fn ensure_cursors(&self, destination: &Destination) -> Result<()> {
        sqlx::query(
            "INSERT INTO log_cursors (destination, partition, done)
             SELECT $1, p, $2::pg_snapshot
             FROM log_config, generate_series(0, partitions - 1) p
             ON CONFLICT DO NOTHING",
        )
        .bind(destination.as_str())
        .bind(NOTHING_DELIVERED)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Claims the partition of `destination`, other than those in `tried`,
    /// that nobody holds and was claimed longest ago (so claims go round
    /// all of them); `None` when every other one is held.
    pub async fn claim_partition(
        &self,
        destination: &Destination,
        owner: &str,
        tried: &[i16],
    ) -> Result<Option<Claimed>> {
        let mut tx = self.pool().begin().await?;
        let row: Option<(i16, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT partition, done::text, \"window\"::text, window_position
             FROM log_cursors WHERE destination = $1 AND partition <> ALL($2)
             ORDER BY updated_at
             LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .bind(destination.as_str())
        .bind(tried)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((partition, done, window, position)) = row else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE log_cursors SET owner = $3, updated_at = now()
             WHERE destination = $1 AND partition = $2",
        )
        .bind(destination.as_str())
        .bind(partition)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        Ok(Some(Claimed {
            moved: false,
            complete: false,
            tx,
            pool: self.pool().clone(),
            destination: destination.as_str().to_owned(),
            partition,
            done,
            window,
            position,
        }))
    }

    /// How far each cursor of `destinations` is behind, by partition. An
    /// event counts until its cursor has passed it: it is neither visible in
    /// `done` nor in the open window at or below the window's position. A
    /// partition whose cursor does not exist yet (no relay has read it)
    /// counts every event in it.
    pub async fn cursor_lag(&self, destinations: &[Destination]) -> Result<Vec<CursorLag>> {
        let names: Vec<&str> = destinations.iter().map(Destination::as_str).collect();
        let rows: Vec<LagRow> = sqlx::query_as(
            "SELECT d.destination, p.partition::int2 AS partition, c.owner, c.delivered_at,
                    count(e.created_at) AS events, min(e.created_at) AS oldest_at
             FROM unnest($1::text[]) d(destination)
             CROSS JOIN log_config cfg
             CROSS JOIN generate_series(0, cfg.partitions - 1) p(partition)
             LEFT JOIN log_cursors c
                    ON c.destination = d.destination AND c.partition = p.partition
             LEFT JOIN LATERAL (
                 SELECT created_at FROM event_log e
                 WHERE e.destination = d.destination AND e.partition = p.partition
                   AND (c.done IS NULL
                        OR e.xid >= pg_snapshot_xmin(c.done)
                           AND NOT pg_visible_in_snapshot(e.xid, c.done)
                           AND (c.\"window\" IS NULL
                                OR NOT pg_visible_in_snapshot(e.xid, c.\"window\")
                                OR e.position > c.window_position))
             ) e ON true
             GROUP BY d.destination, p.partition, c.owner, c.delivered_at
             ORDER BY d.destination, p.partition",
        )
        .bind(names)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| CursorLag {
                destination: r.destination,
                partition: r.partition,
                owner: r.owner,
                delivered_at: r.delivered_at,
                events: r.events,
                oldest_at: r.oldest_at,
            })
            .collect())
    }

    /// The destinations with events or cursors in the log.
    pub async fn log_destinations(&self) -> Result<Vec<Destination>> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT destination FROM log_cursors UNION SELECT DISTINCT destination FROM event_log
             ORDER BY 1",
        )
        .fetch_all(self.pool())
        .await?;
        names
            .into_iter()
            .map(|n| n.parse().map_err(crate::Error::Invariant))
            .collect()
    }

    /// Events of each of `destinations` buried in `log_dead` and not
    /// replayed.
    pub async fn log_dead_counts(
        &self,
        destinations: &[Destination],
    ) -> Result<Vec<(String, i64)>> {
        let names: Vec<&str> = destinations.iter().map(Destination::as_str).collect();
        Ok(sqlx::query_as(
            "SELECT d.destination,
                    (SELECT count(*) FROM log_dead x
                     WHERE x.destination = d.destination AND x.replayed_at IS NULL)
             FROM unnest($1::text[]) d(destination)",
        )
        .bind(names)
        .fetch_all(self.pool())
        .await?)
    }

    /// Truncates every segment that all cursors have passed and the
    /// sequence is not writing into; returns those truncated. A segment an
    /// insert or a read still uses waits for a later turn.
    pub async fn rotate_log(&self) -> Result<Vec<i16>> {
        let shape = self.log_shape().await?;
        let (last, called): (i64, bool) =
            sqlx::query_as("SELECT last_value, is_called FROM event_log_position")
                .fetch_one(self.pool())
                .await?;
        let next = if called { last + 1 } else { last };
        let current = i16::try_from((next / shape.segment_size) % i64::from(shape.segments))
            .unwrap_or_default();
        let mut truncated = Vec::new();
        for segment in (0..shape.segments).filter(|s| *s != current) {
            let table = format!("event_log_{segment}");
            let mut tx = self.pool().begin().await?;
            sqlx::query("SET LOCAL lock_timeout = '500ms'")
                .execute(&mut *tx)
                .await?;
            match sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
                .execute(&mut *tx)
                .await
            {
                Ok(_) => {}
                // 55P03: lock_not_available.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => continue,
                Err(e) => return Err(e.into()),
            }
            // Under the lock no insert into the segment is in flight, so
            // every row it will ever hold is visible here.
            let passed: bool = sqlx::query_scalar(&format!(
                "SELECT EXISTS (SELECT 1 FROM {table})
                    AND NOT EXISTS (
                        SELECT 1 FROM {table} e
                        LEFT JOIN log_cursors c USING (destination, partition)
                        WHERE c.done IS NULL OR NOT pg_visible_in_snapshot(e.xid, c.done))"
            ))
            .fetch_one(&mut *tx)
            .await?;
            if passed {
                sqlx::query(&format!("TRUNCATE {table}"))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                truncated.push(segment);
            }
        }
        Ok(truncated)
    }
}

impl Claimed {
    /// The partition claimed.
    pub fn partition(&self) -> i16 {
        self.partition
    }

    /// The next run of undelivered events, at most `limit`, opening a
    /// window (the current snapshot) when none is open.
    pub async fn read(&mut self, limit: u32) -> Result<Run> {
        let window = match &self.window {
            Some(w) => w.clone(),
            None => {
                // The lowest position of the new window's events, found by
                // transaction id; the run reads on from there by position.
                // The range of transaction ids is read on their index
                // (`ORDER BY xid`, fenced by `OFFSET 0`): otherwise the plan
                // cached for the statement, made without statistics (the
                // log is never analyzed), served min(position) from the
                // position index and filtered every event of the partition
                // from the first: 2,135 buffers a window with 2,800 events
                // in the partition, against 11, and 37% of PostgreSQL's
                // time in the saga bench.
                let (window, floor): (String, Option<i64>) = sqlx::query_as(
                    "WITH w AS (SELECT pg_current_snapshot() AS s)
                     SELECT w.s::text,
                            (SELECT min(position)
                             FROM (SELECT position FROM event_log
                                   WHERE destination = $1 AND partition = $2
                                     AND xid >= pg_snapshot_xmin($3::pg_snapshot)
                                     AND xid < pg_snapshot_xmax(w.s)
                                     AND pg_visible_in_snapshot(xid, w.s)
                                     AND NOT pg_visible_in_snapshot(xid, $3::pg_snapshot)
                                   ORDER BY xid OFFSET 0) fresh)
                     FROM w",
                )
                .bind(&self.destination)
                .bind(self.partition)
                .bind(&self.done)
                .fetch_one(&self.pool)
                .await?;
                let Some(floor) = floor else {
                    // Nothing new: the window is through at once, and the
                    // cursor may stay where it is.
                    return Ok(Run {
                        events: Vec::new(),
                        complete: true,
                    });
                };
                self.window = Some(window.clone());
                self.position = floor - 1;
                window
            }
        };
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, event_id, aggregatetype, aggregateid, type, version,
                    payload::text AS payload, traceparent, created_at
             FROM event_log
             WHERE destination = $1 AND partition = $2 AND position > $3
               AND xid >= pg_snapshot_xmin($4::pg_snapshot)
               AND xid < pg_snapshot_xmax($5::pg_snapshot)
               AND pg_visible_in_snapshot(xid, $5::pg_snapshot)
               AND NOT pg_visible_in_snapshot(xid, $4::pg_snapshot)
             ORDER BY position
             LIMIT $6",
        )
        .bind(&self.destination)
        .bind(self.partition)
        .bind(self.position)
        .bind(&self.done)
        .bind(&window)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let complete = rows.len() < limit as usize;
        let events = rows
            .into_iter()
            .map(|r| {
                Ok(LogEvent {
                    position: r.position,
                    event_id: r.event_id,
                    stream: r.aggregatetype,
                    key: r.aggregateid,
                    kind: r.r#type,
                    version: r.version,
                    payload: serde_json::value::RawValue::from_string(r.payload).map_err(|e| {
                        crate::Error::Invariant(format!("a log payload is not JSON: {e}"))
                    })?,
                    traceparent: r.traceparent,
                    created_at: r.created_at,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(last) = events.last() {
            self.position = last.position;
            self.moved = true;
        }
        if complete {
            self.moved = true;
            self.complete = true;
        }
        Ok(Run { events, complete })
    }

    /// Keeps `event`, which its destination refused for good, in
    /// `log_dead` with the reason, in the transaction that will move the
    /// cursor past it.
    pub async fn bury(&mut self, event: &LogEvent, class: &str, reason: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO log_dead (destination, partition, position, event_id, aggregatetype,
                                   aggregateid, type, version, payload, traceparent, class, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12)
             ON CONFLICT (destination, position) DO NOTHING",
        )
        .bind(&self.destination)
        .bind(self.partition)
        .bind(event.position)
        .bind(event.event_id)
        .bind(&event.stream)
        .bind(&event.key)
        .bind(&event.kind)
        .bind(event.version)
        .bind(event.payload.get())
        .bind(&event.traceparent)
        .bind(class)
        .bind(reason)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Records the run read as passed only up to `last` (its last event
    /// delivered or buried), or not at all with `None`, and lets go: the
    /// rest is read again by the next claim.
    pub async fn advance_through(mut self, last: Option<i64>, run: &Run) -> Result<()> {
        if run.events.last().map(|e| e.position) == last {
            return self.advance().await;
        }
        let Some(last) = last else {
            // The window stays as it was stored (or, new, is opened again).
            return self.release().await;
        };
        self.complete = false;
        self.position = last;
        self.advance().await
    }

    /// Records what was read as delivered and lets go of the partition.
    pub async fn advance(mut self) -> Result<()> {
        if !self.moved {
            self.tx.commit().await?;
            return Ok(());
        }
        if self.complete {
            self.done = self.window.take().unwrap_or(self.done);
            self.position = 0;
        }
        sqlx::query(
            "UPDATE log_cursors
             SET done = $3::pg_snapshot, \"window\" = $4::pg_snapshot, window_position = $5,
                 delivered_at = now(), updated_at = now()
             WHERE destination = $1 AND partition = $2",
        )
        .bind(&self.destination)
        .bind(self.partition)
        .bind(&self.done)
        .bind(&self.window)
        .bind(self.position)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Lets go of the partition without recording anything: what was read
    /// is read again by the next claim.
    pub async fn release(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}

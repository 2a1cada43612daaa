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

/// The condition, over an event `e` and its cursor `c`, that the cursor
/// has not passed the event: it is neither visible in `done` nor in the
/// open window at or below the window's position. The claim, the lag and
/// the rotation all ask it, so a window left open after its last event
/// counts as passed everywhere. (The `xmin` bound lets the index on `xid`
/// skip what `done` sees for certain.)
macro_rules! not_passed {
    () => {
        "e.xid >= pg_snapshot_xmin(c.done)
         AND NOT pg_visible_in_snapshot(e.xid, c.done)
         AND (c.\"window\" IS NULL
              OR NOT pg_visible_in_snapshot(e.xid, c.\"window\")
              OR e.position > c.window_position)"
    };
}

/// The log's fixed shape, from `log_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogShape {
    /// Partitions per destination; a key's partition depends on it.
    pub partitions: u16,
    /// Positions per segment.
    pub segment_size: i64,
    /// Segments in the ring.
    pub segments: i16,
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
    /// Its partition.
    pub partition: i16,
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

/// Partitions claimed by this relay: their cursor rows stay locked, in one
/// transaction, until [`advance`](Self::advance) or
/// [`release`](Self::release), or until the relay's connection drops.
pub struct Claimed {
    tx: Transaction<'static, Postgres>,
    pool: sqlx::PgPool,
    destination: String,
    cursors: Vec<Cursor>,
}

/// One claimed cursor, as read so far.
struct Cursor {
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

/// The events [`Claimed::read`] found in one partition.
#[derive(Debug)]
pub struct Run {
    /// The partition.
    pub partition: i16,
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
    partition: i16,
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
        let (partitions, segment_size, segments): (i16, i64, i16) =
            sqlx::query_as("SELECT partitions, segment_size, segments FROM log_config")
                .fetch_one(self.pool())
                .await?;
        Ok(LogShape {
            partitions: u16::try_from(partitions).unwrap_or(1),
            segment_size,
            segments,
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

    /// Claims one partition of `destination`, as
    /// [`claim_partitions`](Self::claim_partitions) does.
    pub async fn claim_partition(
        &self,
        destination: &Destination,
        owner: &str,
    ) -> Result<Option<Claimed>> {
        self.claim_partitions(destination, owner, 1).await
    }

    /// Claims up to `most` partitions of `destination` that have an open
    /// window or committed events past their `done`, that nobody holds,
    /// claimed longest ago first (so claims go round all of them); `None`
    /// when none is both free and behind. An idle relay thus costs one
    /// statement a pass, not one claim per partition. (A window is open only
    /// while events of it are left, as [`Claimed::read`] closes it with its
    /// last event, so the test needs no position.)
    pub async fn claim_partitions(
        &self,
        destination: &Destination,
        owner: &str,
        most: u16,
    ) -> Result<Option<Claimed>> {
        let mut tx = self.pool().begin().await?;
        let rows: Vec<(i16, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT partition, done::text, \"window\"::text, window_position
             FROM log_cursors c
             WHERE destination = $1
               AND (c.\"window\" IS NOT NULL OR EXISTS (
                   SELECT 1 FROM event_log e
                   WHERE e.destination = c.destination AND e.partition = c.partition
                     AND e.xid >= pg_snapshot_xmin(c.done)
                     AND NOT pg_visible_in_snapshot(e.xid, c.done)))
             ORDER BY updated_at
             LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(destination.as_str())
        .bind(i64::from(most.max(1)))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let partitions: Vec<i16> = rows.iter().map(|r| r.0).collect();
        sqlx::query(
            "UPDATE log_cursors SET owner = $3, updated_at = now()
             WHERE destination = $1 AND partition = ANY($2)",
        )
        .bind(destination.as_str())
        .bind(&partitions)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        Ok(Some(Claimed {
            tx,
            pool: self.pool().clone(),
            destination: destination.as_str().to_owned(),
            cursors: rows
                .into_iter()
                .map(|(partition, done, window, position)| Cursor {
                    partition,
                    done,
                    window,
                    position,
                    moved: false,
                    complete: false,
                })
                .collect(),
        }))
    }

    /// How far each cursor of `destinations` is behind, by partition. An
    /// event counts until its cursor has passed it: it is neither visible in
    /// `done` nor in the open window at or below the window's position. A
    /// partition whose cursor does not exist yet (no relay has read it)
    /// counts every event in it.
    pub async fn cursor_lag(&self, destinations: &[Destination]) -> Result<Vec<CursorLag>> {
        let names: Vec<&str> = destinations.iter().map(Destination::as_str).collect();
        let rows: Vec<LagRow> = sqlx::query_as(concat!(
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
                   AND (c.done IS NULL OR (",
            not_passed!(),
            "))
             ) e ON true
             GROUP BY d.destination, p.partition, c.owner, c.delivered_at
             ORDER BY d.destination, p.partition"
        ))
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
                        WHERE c.done IS NULL OR ({}))",
                not_passed!()
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
    /// The partitions claimed, in claim order.
    pub fn partitions(&self) -> Vec<i16> {
        self.cursors.iter().map(|c| c.partition).collect()
    }

    /// The first partition claimed.
    pub fn partition(&self) -> i16 {
        self.cursors[0].partition
    }

    /// The next run of the first partition claimed, as
    /// [`read_all`](Self::read_all) reads each.
    pub async fn read(&mut self, limit: u32) -> Result<Run> {
        self.read_cursor(0, limit).await
    }

    /// The next run of undelivered events of every partition claimed, at
    /// most `limit` each, in claim order.
    pub async fn read_all(&mut self, limit: u32) -> Result<Vec<Run>> {
        let mut runs = Vec::with_capacity(self.cursors.len());
        for i in 0..self.cursors.len() {
            runs.push(self.read_cursor(i, limit).await?);
        }
        Ok(runs)
    }

    /// The next run of cursor `i`, opening a window (the current snapshot)
    /// when none is open. One event more than `limit` is read, so a run
    /// that ends the window says so and the window closes with it.
    async fn read_cursor(&mut self, i: usize, limit: u32) -> Result<Run> {
        let pool = self.pool.clone();
        let destination = self.destination.clone();
        let cursor = &mut self.cursors[i];
        let partition = cursor.partition;
        let window = match &cursor.window {
            Some(w) => w.clone(),
            None => {
                // The lowest position of the new window's events, found by
                // transaction id; the run reads on from there by position.
                let (window, floor): (String, Option<i64>) = sqlx::query_as(
                    "WITH w AS (SELECT pg_current_snapshot() AS s)
                     SELECT w.s::text,
                            (SELECT min(position) FROM event_log
                             WHERE destination = $1 AND partition = $2
                               AND xid >= pg_snapshot_xmin($3::pg_snapshot)
                               AND xid < pg_snapshot_xmax(w.s)
                               AND pg_visible_in_snapshot(xid, w.s)
                               AND NOT pg_visible_in_snapshot(xid, $3::pg_snapshot))
                     FROM w",
                )
                .bind(&destination)
                .bind(partition)
                .bind(&cursor.done)
                .fetch_one(&pool)
                .await?;
                let Some(floor) = floor else {
                    // Nothing new: the window is through at once, and the
                    // cursor may stay where it is.
                    return Ok(Run {
                        partition,
                        events: Vec::new(),
                        complete: true,
                    });
                };
                cursor.window = Some(window.clone());
                cursor.position = floor - 1;
                window
            }
        };
        let mut rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, partition, event_id, aggregatetype, aggregateid, type, version,
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
        .bind(&destination)
        .bind(partition)
        .bind(cursor.position)
        .bind(&cursor.done)
        .bind(&window)
        .bind(i64::from(limit) + 1)
        .fetch_all(&pool)
        .await?;
        let complete = rows.len() <= limit as usize;
        rows.truncate(limit as usize);
        let events = rows
            .into_iter()
            .map(|r| {
                Ok(LogEvent {
                    position: r.position,
                    partition: r.partition,
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
            cursor.position = last.position;
            cursor.moved = true;
        }
        if complete {
            cursor.moved = true;
            cursor.complete = true;
        }
        Ok(Run {
            partition,
            events,
            complete,
        })
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
        .bind(event.partition)
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

    /// Records each run read as passed only up to its `last` event
    /// (delivered or buried), or not at all with `None`, and lets go of
    /// every partition: the rest is read again by the next claim.
    pub async fn advance_through(mut self, passed: &[(Option<i64>, &Run)]) -> Result<()> {
        for (last, run) in passed {
            let Some(cursor) = self
                .cursors
                .iter_mut()
                .find(|c| c.partition == run.partition)
            else {
                continue;
            };
            if run.events.last().map(|e| e.position) == *last {
                continue;
            }
            match last {
                // The window stays as it was stored (or, new, is opened
                // again).
                None => cursor.moved = false,
                Some(last) => {
                    cursor.complete = false;
                    cursor.position = *last;
                }
            }
        }
        self.advance().await
    }

    /// Records what was read as delivered and lets go of the partitions.
    pub async fn advance(mut self) -> Result<()> {
        let moved: Vec<&mut Cursor> = self.cursors.iter_mut().filter(|c| c.moved).collect();
        if moved.is_empty() {
            self.tx.commit().await?;
            return Ok(());
        }
        let (mut partitions, mut dones, mut windows, mut positions) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for cursor in moved {
            if cursor.complete {
                cursor.done = cursor.window.take().unwrap_or(cursor.done.clone());
                cursor.position = 0;
            }
            partitions.push(cursor.partition);
            dones.push(cursor.done.clone());
            windows.push(cursor.window.clone());
            positions.push(cursor.position);
        }
        sqlx::query(
            "UPDATE log_cursors c
             SET done = u.done::pg_snapshot, \"window\" = u.w::pg_snapshot,
                 window_position = u.p, delivered_at = now(), updated_at = now()
             FROM unnest($2::int2[], $3::text[], $4::text[], $5::int8[]) AS u(partition, done, w, p)
             WHERE c.destination = $1 AND c.partition = u.partition",
        )
        .bind(&self.destination)
        .bind(partitions)
        .bind(dones)
        .bind(windows)
        .bind(positions)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Lets go of the partitions without recording anything: what was read
    /// is read again by the next claim.
    pub async fn release(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}

//! Leader-only upkeep of the outbox: rescuing expired claims, deleting
//! finished rows past retention, and refreshing the backlog figures. Each
//! statement is safe when two leaders overlap for a moment.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{Destination, SyncStats};

use crate::log::CursorLag;
use crate::{Error, Result, Store, TaskId};

/// What the leader's recount found.
#[derive(Debug, Clone)]
pub struct Backlog {
    /// Each destination's figures, as [`Store::sync_stats`] serves them.
    pub destinations: Vec<SyncStats>,
    /// Each log cursor's lag, for event-stream destinations.
    pub cursors: Vec<CursorLag>,
    /// When each job-row destination last had a task delivered.
    pub delivered: Vec<(String, Option<DateTime<Utc>>)>,
}

impl Backlog {
    /// When `destination` last had something delivered: its newest done
    /// task, or for an event stream the latest move of a cursor past a
    /// delivery.
    pub fn last_delivery(&self, destination: &str) -> Option<DateTime<Utc>> {
        let tasks = self
            .delivered
            .iter()
            .filter(|d| d.0 == destination)
            .filter_map(|d| d.1);
        let cursors = self
            .cursors
            .iter()
            .filter(|c| c.destination == destination)
            .filter_map(|c| c.delivered_at);
        tasks.chain(cursors).max()
    }
}

/// Backlog figures older than this are recounted on read, so the API stays
/// right when no relay leads.
const FRESH_FOR_SECONDS: f64 = 30.0;

type BacklogRow = (String, i64, i64, i64, Option<DateTime<Utc>>, DateTime<Utc>);

/// Live counts of the destinations in `$1`: destination, pending, running,
/// dead, oldest pending `created_at`, now. Each state is counted through
/// its own partial index, so the cost is the open rows, not the table: one
/// scan for all three states (`state IN (…)`) cannot use those indexes, and
/// read every row kept for retention (49,000 rows and up to 119 ms every
/// 5 s in the latency benchmark; millions a week in production). Public so
/// that tests can read its plan.
pub const LIVE_COUNTS: &str = "SELECT d.destination, p.pending, r.running, x.dead, p.oldest, now()
     FROM unnest($1::text[]) AS d(destination)
     CROSS JOIN LATERAL (
         SELECT count(*) AS pending, min(created_at) AS oldest FROM outbox
         WHERE destination = d.destination AND state = 'pending'
     ) p
     CROSS JOIN LATERAL (
         SELECT count(*) AS running FROM outbox
         WHERE destination = d.destination AND state = 'running'
     ) r
     CROSS JOIN LATERAL (
         SELECT count(*) AS dead FROM outbox
         WHERE destination = d.destination AND state = 'dead'
     ) x";

fn stats(
    (destination, pending, running, dead, oldest, refreshed_at): BacklogRow,
    now: DateTime<Utc>,
) -> Result<SyncStats> {
    Ok(SyncStats {
        destination: destination.parse().map_err(Error::Invariant)?,
        pending,
        running,
        dead,
        oldest_pending_age_seconds: oldest
            .map_or(0.0, |o| (now - o).num_milliseconds().max(0) as f64 / 1000.0),
        refreshed_at,
    })
}

impl Store {
    /// Returns claims whose lease ran out (their relay died or hung) to
    /// `pending`, at most `limit` at a time, and says which. Each row is
    /// locked and fenced by the token it had, so of two overlapping leaders
    /// only one rescues a given claim, and never a claim taken since.
    pub async fn rescue_expired(&self, limit: u32) -> Result<Vec<TaskId>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE outbox t
             SET state = 'pending', run_at = now(), claim_token = NULL,
                 claim_expires_at = NULL, claimed_by = NULL, updated_at = now(),
                 last_error = COALESCE(t.last_error, 'claim expired')
             FROM (SELECT id, claim_token FROM outbox
                   WHERE state = 'running' AND claim_expires_at < now()
                   ORDER BY claim_expires_at LIMIT $1
                   FOR UPDATE SKIP LOCKED) x
             WHERE t.id = x.id AND t.claim_token = x.claim_token
             RETURNING t.id",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(TaskId).collect())
    }

    /// Deletes up to `limit` done or superseded tasks that finished more
    /// than `retention` ago, idempotency keys older than `key_ttl`, and
    /// consumers' inbox rows older than `inbox_window` (a redelivery later
    /// than that would be applied again). Returns the number of tasks
    /// deleted.
    pub async fn delete_finished(
        &self,
        retention: Duration,
        key_ttl: Duration,
        inbox_window: Duration,
        limit: u32,
    ) -> Result<u64> {
        let tasks = sqlx::query(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox
                 WHERE state IN ('done', 'superseded')
                   AND finished_at < now() - make_interval(secs => $1)
                 ORDER BY finished_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
        )
        .bind(retention.as_secs_f64())
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE key IN (
                 SELECT key FROM idempotency_keys
                 WHERE created_at < now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(key_ttl.as_secs_f64())
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "DELETE FROM inbox WHERE (consumer, message_id) IN (
                 SELECT consumer, message_id FROM inbox
                 WHERE received_at < now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(inbox_window.as_secs_f64())
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(tasks)
    }

    /// Counts the backlog of each destination and stores the figures for
    /// [`Store::sync_stats`].
    pub async fn refresh_backlog(&self, destinations: &[Destination]) -> Result<Backlog> {
        let (live, cursors) = self.live_backlog(destinations).await?;
        let column = |f: fn(&BacklogRow) -> i64| live.iter().map(f).collect::<Vec<_>>();
        let rows: Vec<BacklogRow> = sqlx::query_as(
            "INSERT INTO outbox_backlog (destination, pending, running, dead,
                                         oldest_pending_at, refreshed_at)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[],
                                  $5::timestamptz[], $6::timestamptz[])
             ON CONFLICT (destination) DO UPDATE SET pending = EXCLUDED.pending,
                 running = EXCLUDED.running, dead = EXCLUDED.dead,
                 oldest_pending_at = EXCLUDED.oldest_pending_at,
                 refreshed_at = EXCLUDED.refreshed_at
             RETURNING destination, pending, running, dead, oldest_pending_at, refreshed_at",
        )
        .bind(live.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
        .bind(column(|r| r.1))
        .bind(column(|r| r.2))
        .bind(column(|r| r.3))
        .bind(live.iter().map(|r| r.4).collect::<Vec<_>>())
        .bind(live.iter().map(|r| r.5).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        let snapshots: Vec<&str> = destinations
            .iter()
            .filter(|d| d.takes_snapshots())
            .map(Destination::as_str)
            .collect();
        // The newest done row, read backwards on the finished rows' index.
        let delivered = sqlx::query_as(
            "SELECT d.destination,
                    (SELECT finished_at FROM outbox
                     WHERE state = 'done' AND destination = d.destination
                     ORDER BY finished_at DESC LIMIT 1)
             FROM unnest($1::text[]) AS d(destination)",
        )
        .bind(snapshots)
        .fetch_all(&self.pool)
        .await?;
        Ok(Backlog {
            destinations: rows
                .into_iter()
                .map(|r| stats(r.clone(), r.5))
                .collect::<Result<_>>()?,
            cursors,
            delivered,
        })
    }

    /// The live backlog of `destinations`: their outbox rows, plus for an
    /// event stream the log events its cursors have not passed (pending)
    /// and those buried in `log_dead` (dead); and each cursor's lag.
    async fn live_backlog(
        &self,
        destinations: &[Destination],
    ) -> Result<(Vec<BacklogRow>, Vec<CursorLag>)> {
        let names: Vec<&str> = destinations.iter().map(Destination::as_str).collect();
        let mut rows: Vec<BacklogRow> = sqlx::query_as(LIVE_COUNTS)
            .bind(names)
            .fetch_all(&self.pool)
            .await?;
        let streams: Vec<Destination> = destinations
            .iter()
            .filter(|d| !d.takes_snapshots())
            .cloned()
            .collect();
        if streams.is_empty() {
            return Ok((rows, Vec::new()));
        }
        let lag = self.cursor_lag(&streams).await?;
        let dead = self.log_dead_counts(&streams).await?;
        for row in &mut rows {
            for cursor in lag.iter().filter(|c| c.destination == row.0) {
                row.1 += cursor.events;
                row.4 = match (row.4, cursor.oldest_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            row.3 += dead
                .iter()
                .filter(|d| d.0 == row.0)
                .map(|d| d.1)
                .sum::<i64>();
        }
        Ok((rows, lag))
    }

    /// One destination's backlog: the leader's figures while they are fresh,
    /// otherwise a live count. The oldest pending age is always as of now.
    pub async fn sync_stats(&self, destination: &Destination) -> Result<SyncStats> {
        let stored: Option<(BacklogRow, DateTime<Utc>)> = sqlx::query_as(&format!(
            "SELECT destination, pending, running, dead, oldest_pending_at, refreshed_at, now()
             FROM outbox_backlog
             WHERE destination = $1
               AND refreshed_at > now() - make_interval(secs => {FRESH_FOR_SECONDS})"
        ))
        .bind(destination.as_str())
        .fetch_optional(&self.pool)
        .await?
        .map(|(d, p, r, x, o, at, now)| ((d, p, r, x, o, at), now));
        if let Some((row, now)) = stored {
            return stats(row, now);
        }
        let row = self
            .live_backlog(std::slice::from_ref(destination))
            .await?
            .0
            .pop()
            .ok_or_else(|| Error::Invariant("a live count returned no row".into()))?;
        stats(row.clone(), row.5)
    }
}

impl Store {
    /// Records the breaker `states` (destination, state) of relay `relay_id`,
    /// as of now, and deletes the rows of other relays gone an hour (in the
    /// same statement: every relay reports every few seconds anyway; its
    /// own rows are left to the upsert, which one statement may not also
    /// delete).
    pub async fn report_breakers(&self, relay_id: &str, states: &[(&str, &str)]) -> Result<()> {
        let (destinations, states): (Vec<&str>, Vec<&str>) = states.iter().copied().unzip();
        sqlx::query(
            "WITH gone AS (DELETE FROM relay_breakers
                           WHERE seen_at < now() - interval '1 hour' AND relay_id <> $1)
             INSERT INTO relay_breakers (destination, relay_id, state, seen_at)
             SELECT d, $1, s, now() FROM unnest($2::text[], $3::text[]) AS t(d, s)
             ON CONFLICT (destination, relay_id)
             DO UPDATE SET state = EXCLUDED.state, seen_at = EXCLUDED.seen_at",
        )
        .bind(relay_id)
        .bind(destinations)
        .bind(states)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The breakers reported within `fresh`: (destination, relay, state),
    /// by destination and relay.
    pub async fn breakers(&self, fresh: Duration) -> Result<Vec<(String, String, String)>> {
        Ok(sqlx::query_as(
            "SELECT destination, relay_id, state FROM relay_breakers
             WHERE seen_at > now() - make_interval(secs => $1)
             ORDER BY destination, relay_id",
        )
        .bind(fresh.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }
}

//! Leader-only upkeep of the outbox: rescuing expired claims, deleting
//! finished rows past retention, and refreshing the backlog figures. Each
//! statement is safe when two leaders overlap for a moment.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::SyncStats;

use crate::{Result, Store, TaskId};

/// Backlog figures older than this are recounted on read, so the API stays
/// right when no relay leads.
const FRESH_FOR_SECONDS: f64 = 30.0;

type BacklogRow = (i64, i64, i64, Option<DateTime<Utc>>, DateTime<Utc>);

const LIVE_COUNTS: &str = "SELECT count(*) FILTER (WHERE state = 'pending'),
            count(*) FILTER (WHERE state = 'running'),
            count(*) FILTER (WHERE state = 'dead'),
            min(created_at) FILTER (WHERE state = 'pending'),
            now()
     FROM onec_tasks WHERE state IN ('pending', 'running', 'dead')";

fn stats(
    (pending, running, dead, oldest, refreshed_at): BacklogRow,
    now: DateTime<Utc>,
) -> SyncStats {
    SyncStats {
        pending,
        running,
        dead,
        oldest_pending_age_seconds: oldest
            .map_or(0.0, |o| (now - o).num_milliseconds().max(0) as f64 / 1000.0),
        refreshed_at,
    }
}

impl Store {
    /// Returns claims whose lease ran out (their relay died or hung) to
    /// `pending`, at most `limit` at a time, and says which. Each row is
    /// locked and fenced by the token it had, so of two overlapping leaders
    /// only one rescues a given claim, and never a claim taken since.
    pub async fn rescue_expired(&self, limit: u32) -> Result<Vec<TaskId>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE onec_tasks t
             SET state = 'pending', run_at = now(), claim_token = NULL,
                 claim_expires_at = NULL, claimed_by = NULL, updated_at = now(),
                 last_error = COALESCE(t.last_error, 'claim expired')
             FROM (SELECT id, claim_token FROM onec_tasks
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
    /// than `retention` ago, and idempotency keys older than `key_ttl`.
    /// Returns the number of tasks deleted.
    pub async fn delete_finished(
        &self,
        retention: Duration,
        key_ttl: Duration,
        limit: u32,
    ) -> Result<u64> {
        let tasks = sqlx::query(
            "DELETE FROM onec_tasks WHERE id IN (
                 SELECT id FROM onec_tasks
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
        Ok(tasks)
    }

    /// Counts the backlog and stores the figures for [`Store::sync_stats`].
    pub async fn refresh_backlog(&self) -> Result<SyncStats> {
        let row: BacklogRow = sqlx::query_as(&format!(
            "WITH live AS ({LIVE_COUNTS})
             INSERT INTO onec_backlog (pending, running, dead, oldest_pending_at, refreshed_at)
             SELECT * FROM live
             ON CONFLICT (id) DO UPDATE SET pending = EXCLUDED.pending,
                 running = EXCLUDED.running, dead = EXCLUDED.dead,
                 oldest_pending_at = EXCLUDED.oldest_pending_at,
                 refreshed_at = EXCLUDED.refreshed_at
             RETURNING pending, running, dead, oldest_pending_at, refreshed_at"
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(stats(row, row.4))
    }

    /// The backlog: the leader's figures while they are fresh, otherwise a
    /// live count. The oldest pending age is always as of now.
    pub async fn sync_stats(&self) -> Result<SyncStats> {
        let stored: Option<(BacklogRow, DateTime<Utc>)> = sqlx::query_as(&format!(
            "SELECT pending, running, dead, oldest_pending_at, refreshed_at, now() FROM onec_backlog
             WHERE refreshed_at > now() - make_interval(secs => {FRESH_FOR_SECONDS})"
        ))
        .fetch_optional(&self.pool)
        .await?
        .map(|(p, r, d, o, at, now)| ((p, r, d, o, at), now));
        if let Some((row, now)) = stored {
            return Ok(stats(row, now));
        }
        let row: BacklogRow = sqlx::query_as(LIVE_COUNTS).fetch_one(&self.pool).await?;
        Ok(stats(row, row.4))
    }
}

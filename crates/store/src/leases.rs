//! Leader leases in PostgreSQL: one row per lease, taken and renewed by one
//! conditional upsert each. No advisory locks, so it works behind PgBouncer.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{Result, Store};

/// Channel on which a resigning leader wakes the candidates.
pub const LEADER_CHANNEL: &str = "orders_center_leader";

/// A lease this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHeld {
    /// Until when, by the database's clock.
    pub expires_at: DateTime<Utc>,
    /// How many times the lease changed hands.
    pub transitions: i64,
}

impl Store {
    /// Takes lease `name` for `holder` if it is free or expired, or, with
    /// `renew` (the holder leads), if it is already `holder`'s; extends it
    /// by `duration`. `None` if it was not taken. A holder that stepped
    /// down must not renew its own row, or nobody else could ever take it.
    pub async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        duration: Duration,
        renew: bool,
    ) -> Result<Option<LeaseHeld>> {
        let held: Option<(DateTime<Utc>, i64)> = sqlx::query_as(
            "INSERT INTO leader_leases AS l (name, holder, acquired_at, renewed_at, expires_at, transitions)
             VALUES ($1, $2, now(), now(), now() + make_interval(secs => $3), 0)
             ON CONFLICT (name) DO UPDATE SET
                 holder = EXCLUDED.holder,
                 acquired_at = CASE WHEN l.holder IS NOT DISTINCT FROM EXCLUDED.holder
                                    THEN l.acquired_at ELSE now() END,
                 renewed_at = now(),
                 expires_at = EXCLUDED.expires_at,
                 transitions = l.transitions
                     + CASE WHEN l.holder IS NOT DISTINCT FROM EXCLUDED.holder THEN 0 ELSE 1 END
             WHERE ($4 AND l.holder = EXCLUDED.holder) OR l.holder IS NULL OR l.expires_at < now()
             RETURNING expires_at, transitions",
        )
        .bind(name)
        .bind(holder)
        .bind(duration.as_secs_f64())
        .bind(renew)
        .fetch_optional(&self.pool)
        .await?;
        Ok(held.map(|(expires_at, transitions)| LeaseHeld {
            expires_at,
            transitions,
        }))
    }

    /// Gives lease `name` up if `holder` has it, and wakes the candidates.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let released = sqlx::query(
            "UPDATE leader_leases SET holder = NULL, expires_at = now()
             WHERE name = $1 AND holder = $2",
        )
        .bind(name)
        .bind(holder)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if released {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(LEADER_CHANNEL)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(released)
    }
}

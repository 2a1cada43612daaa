//! Writes to the `onec_tasks` outbox and the backlog figures read from it.
//! Claiming and completing tasks belong to the relay.

use chrono::{DateTime, Utc};
use domain::{OrderFull, OrderId};
use sqlx::types::Json;
use sqlx::PgConnection;

use crate::Result;

/// The channel the saving transaction notifies and the relays listen on.
pub const NOTIFY_CHANNEL: &str = "onec_tasks";

pub(crate) struct Enqueued {
    pub id: i64,
    pub created_at: DateTime<Utc>,
}

/// Queues delivery of one order version and wakes the relays. Runs inside the
/// saving transaction: the task exists exactly when the save commits, and
/// PostgreSQL delivers the notification only on commit.
pub(crate) async fn enqueue(
    conn: &mut PgConnection,
    order: &OrderId,
    version: i64,
    snapshot: &OrderFull,
    traceparent: Option<&str>,
) -> Result<Enqueued> {
    let (id, created_at): (i64, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO onec_tasks (order_id, order_version, snapshot, traceparent)
         VALUES ($1, $2, $3, $4)
         RETURNING id, created_at",
    )
    .bind(order.as_str())
    .bind(version)
    .bind(Json(snapshot))
    .bind(traceparent)
    .fetch_one(&mut *conn)
    .await?;
    notify(conn).await?;
    Ok(Enqueued { id, created_at })
}

/// Wakes the relays when the current transaction commits.
pub(crate) async fn notify(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

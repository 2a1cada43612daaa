//! The relay's side of the `onec_tasks` outbox: claiming, completing,
//! retrying, releasing and rescuing tasks, plus listing and replaying them.
//!
//! Every transition out of `running` is fenced by the claim token, so a
//! worker whose claim expired and was taken over can never overwrite the
//! newer outcome.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{TaskState, TaskSummary};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use crate::{Error, Result, Store};

/// Id of an outbox task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The proof of one claim. A new one is drawn for every claim, so only the
/// current claimant can complete, retry, release or bury the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken(pub Uuid);

/// A task claimed for delivery.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    /// The task.
    pub id: TaskId,
    /// The order it delivers.
    pub order_id: String,
    /// The order version it carries.
    pub version: i64,
    /// The OrderFull as committed.
    pub snapshot: serde_json::Value,
    /// Attempts including this one.
    pub attempts: i32,
    /// Fences every outcome of this claim.
    pub token: ClaimToken,
    /// W3C trace context of the save.
    pub traceparent: Option<String>,
    /// When the save committed; the start of the commit-to-delivery lag.
    pub created_at: DateTime<Utc>,
}

/// Claim settings.
#[derive(Debug, Clone)]
pub struct ClaimSpec<'a> {
    /// Written to `claimed_by`, for operators.
    pub claimant: &'a str,
    /// Most tasks to claim.
    pub limit: u32,
    /// How long the claim holds before any relay may rescue it.
    pub lease: Duration,
}

/// A statement that leaves `running` for the claim `$1` (task id), `$2`
/// (token), returning one row if the claim was still held. Leaving `running`
/// always drops the claim: the CHECK constraint keeps `running` and the claim
/// fields in step. It also unparks the order's newer versions.
fn fenced(set: &str) -> String {
    format!(
        "WITH left_running AS (
             UPDATE onec_tasks SET {set}, claim_token = NULL, claim_expires_at = NULL,
                 claimed_by = NULL, updated_at = now()
             WHERE id = $1 AND claim_token = $2 AND state = 'running'
             RETURNING order_id, order_version
         ),
         {UNPARK}
         SELECT 1 FROM left_running"
    )
}

/// A CTE that makes the versions parked behind the rows of `left_running`
/// due now: a claim parked them for up to a second, but the order is free as
/// soon as its running version is done with. Newer pending versions
/// behind a running one were never tried, so none has a backoff to keep.
/// Each is rewritten even when not parked, which fences a claim that is
/// about to park it (see `parked` in [`Store::claim_batch`]).
const UNPARK: &str = "unparked AS (
             UPDATE onec_tasks p SET run_at = least(p.run_at, now())
             FROM left_running l
             WHERE p.order_id = l.order_id AND p.order_version > l.order_version
               AND p.state = 'pending'
         )";

/// Advisory lock namespace of per-order claim locks ("1C").
const ORDER_LOCK_CLASS: i32 = 0x1C;

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: i64,
    order_id: String,
    order_version: i64,
    #[sqlx(try_from = "String")]
    state: TaskState,
    attempts: i32,
    run_at: DateTime<Utc>,
    claimed_by: Option<String>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<SummaryRow> for TaskSummary {
    fn from(r: SummaryRow) -> Self {
        Self {
            id: r.id,
            order_id: r.order_id,
            version: r.order_version,
            state: r.state,
            attempts: r.attempts,
            run_at: r.run_at,
            claimed_by: r.claimed_by,
            last_error: r.last_error,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const SUMMARY_COLUMNS: &str = "id, order_id, order_version, state, attempts, run_at, claimed_by, \
                               last_error, created_at, updated_at";

/// What one claim did.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// Tasks now held by this relay.
    pub tasks: Vec<ClaimedTask>,
    /// Older pending versions that newer ones superseded.
    pub superseded: u64,
    /// The page of due candidates was full: more may be waiting, even if
    /// few were claimed (several versions of one order share one claim).
    pub more: bool,
}

/// One row per claimed task, or a single row of NULLs when none was claimed;
/// either way it carries the superseded count.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    superseded: i64,
    id: Option<i64>,
    order_id: Option<String>,
    order_version: Option<i64>,
    snapshot: Option<Json<serde_json::Value>>,
    attempts: Option<i32>,
    claim_token: Option<Uuid>,
    traceparent: Option<String>,
    created_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Claims up to `spec.limit` tasks in one short transaction.
    ///
    /// 1. Due pending rows are locked `FOR UPDATE SKIP LOCKED`, so concurrent
    ///    relays take disjoint candidates, and each candidate's order is locked
    ///    with a transaction-scoped advisory lock (safe behind PgBouncer).
    /// 2. A second statement, whose snapshot is taken only after those locks
    ///    are held and so sees every committed claim of those orders, claims
    ///    for each locked order its newest pending version: only if the order
    ///    has nothing running, the version is due, nothing newer was already
    ///    delivered, and no older version is still in doubt (1C may yet apply
    ///    a timed-out attempt). Older pending versions become `superseded`.
    ///
    /// So at most one task per order is ever running, and a version is never
    /// sent after a newer one.
    pub async fn claim_batch(&self, spec: &ClaimSpec<'_>) -> Result<Claimed> {
        let mut tx = self.pool.begin().await?;
        // One row per candidate, so a full page says more may be waiting
        // even when several candidates share an order.
        let candidates: Vec<(String, bool)> = sqlx::query_as(
            "SELECT c.order_id, pg_try_advisory_xact_lock($2, hashtext(c.order_id))
             FROM (
                 SELECT order_id FROM onec_tasks
                 WHERE state = 'pending' AND run_at <= now()
                 ORDER BY run_at, id
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED
             ) c",
        )
        .bind(i64::from(spec.limit))
        .bind(ORDER_LOCK_CLASS)
        .fetch_all(&mut *tx)
        .await?;
        let more = candidates.len() >= spec.limit as usize;
        let mut orders: Vec<String> = candidates
            .into_iter()
            .filter_map(|(order, mine)| mine.then_some(order))
            .collect();
        orders.sort_unstable();
        orders.dedup();
        if orders.is_empty() {
            tx.commit().await?;
            return Ok(Claimed {
                more,
                ..Claimed::default()
            });
        }

        // Every step reads by key: an order's versions, then one id per
        // lock. So no plan can scan the pending set (a hash join, or a bitmap
        // AND with the claimable index, costs O(backlog) per claim), and each
        // lock sits in its own subquery, so PostgreSQL need not carry
        // whole-row copies of a joined CTE for rechecks.
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "WITH lanes AS (
                 SELECT a.busy, a.floor, a.head, a.pending, a.doubt, a.head_xmin,
                        -- Behind a running version, at most a second: a
                        -- completion whose snapshot predates a new version
                        -- cannot unpark it, so a missed wake-up costs no more.
                        CASE WHEN a.busy THEN least(a.busy_until, now() + interval '1 second')
                             ELSE a.doubt_until END AS blocked_until
                 FROM unnest($1::text[]) AS o(order_id)
                 CROSS JOIN LATERAL (
                     SELECT bool_or(t.state = 'running') AS busy,
                            max(t.claim_expires_at) AS busy_until,
                            max(t.in_doubt_until) AS doubt_until,
                            (array_agg(t.xmin ORDER BY t.order_version DESC)
                                FILTER (WHERE t.state = 'pending'))[1] AS head_xmin,
                            max(t.order_version)
                                FILTER (WHERE t.state IN ('running', 'done')) AS floor,
                            max(t.order_version) FILTER (WHERE t.state = 'pending') AS head,
                            array_agg(t.id ORDER BY t.order_version DESC)
                                FILTER (WHERE t.state = 'pending') AS pending,
                            max(t.order_version)
                                FILTER (WHERE t.in_doubt_until > now()) AS doubt
                     FROM onec_tasks t WHERE t.order_id = o.order_id
                 ) a
             ),
             heads AS (
                 SELECT h.id FROM lanes l
                 CROSS JOIN LATERAL (
                     SELECT id FROM onec_tasks
                     WHERE id = l.pending[1] AND state = 'pending' AND run_at <= now()
                     FOR UPDATE SKIP LOCKED
                 ) h
                 WHERE NOT l.busy AND (l.floor IS NULL OR l.head > l.floor)
                   AND (l.doubt IS NULL OR l.head <= l.doubt)
             ),
             older AS (
                 SELECT o.id FROM lanes l
                 CROSS JOIN LATERAL unnest(
                     CASE WHEN l.head <= l.floor THEN l.pending ELSE l.pending[2:] END
                 ) AS v(id)
                 CROSS JOIN LATERAL (
                     SELECT id FROM onec_tasks WHERE id = v.id AND state = 'pending'
                     FOR UPDATE SKIP LOCKED
                 ) o
             ),
             -- A head that cannot go now (its order runs elsewhere, or an
             -- older version may still land) waits until the blocker can
             -- end, out of the candidate pages, so it never crowds out
             -- unrelated orders. Leaving `running` brings it back at once
             -- (UNPARK). That rewrites the head even when it was not parked
             -- yet, so if it does so after this snapshot, the xmin check
             -- fails on recheck and the head is not parked behind a blocker
             -- that is already gone.
             parked AS (
                 UPDATE onec_tasks
                 SET run_at = l.blocked_until
                 FROM lanes l
                 WHERE onec_tasks.id = l.pending[1] AND onec_tasks.state = 'pending'
                   AND onec_tasks.xmin = l.head_xmin
                   AND onec_tasks.run_at < l.blocked_until
                   AND (l.floor IS NULL OR l.head > l.floor)
                   AND (l.busy OR l.head > l.doubt)
             ),
             superseded AS (
                 UPDATE onec_tasks
                 SET state = 'superseded', finished_at = now(), updated_at = now()
                 WHERE id = ANY(ARRAY(SELECT id FROM older))
                 RETURNING id
             ),
             claimed AS (
                 UPDATE onec_tasks
                 SET state = 'running', attempts = attempts + 1, claimed_by = $2,
                     claim_token = gen_random_uuid(),
                     claim_expires_at = now() + make_interval(secs => $3),
                     updated_at = now()
                 WHERE id = ANY(ARRAY(SELECT id FROM heads))
                 RETURNING id, order_id, order_version, snapshot, attempts,
                           claim_token, traceparent, created_at
             )
             SELECT (SELECT count(*) FROM superseded) AS superseded, c.*
             FROM (SELECT 1) one LEFT JOIN claimed c ON true",
        )
        .bind(&orders)
        .bind(spec.claimant)
        .bind(spec.lease.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let superseded = rows.first().map_or(0, |r| r.superseded as u64);
        let tasks = rows
            .into_iter()
            .filter_map(|r| {
                Some(ClaimedTask {
                    id: TaskId(r.id?),
                    order_id: r.order_id?,
                    version: r.order_version?,
                    snapshot: r.snapshot?.0,
                    attempts: r.attempts?,
                    token: ClaimToken(r.claim_token?),
                    traceparent: r.traceparent,
                    created_at: r.created_at?,
                })
            })
            .collect();
        Ok(Claimed {
            tasks,
            superseded,
            more,
        })
    }

    /// Marks a claimed task delivered. False if the claim was lost.
    pub async fn complete(&self, id: TaskId, token: ClaimToken) -> Result<bool> {
        Ok(self.complete_many(&[(id, token)]).await? == 1)
    }

    /// Marks many claimed tasks delivered in one statement, each fenced by
    /// its own token. Returns how many claims were still held.
    ///
    /// Tokens are fresh per claim, so a token names one claim of one task and
    /// `claim_token = ANY(tokens)` fences each row by its own. The ids only
    /// steer the plan onto the primary key: a join with `unnest` was planned
    /// as a nested loop over every running row, quadratic in the batch.
    pub async fn complete_many(&self, claims: &[(TaskId, ClaimToken)]) -> Result<u64> {
        if claims.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = claims.iter().map(|(id, _)| id.0).collect();
        let tokens: Vec<Uuid> = claims.iter().map(|(_, token)| token.0).collect();
        let done: i64 = sqlx::query_scalar(&format!(
            "WITH left_running AS (
                 UPDATE onec_tasks t
                 SET state = 'done', finished_at = now(), last_error = NULL, claim_token = NULL,
                     claim_expires_at = NULL, claimed_by = NULL, updated_at = now()
                 WHERE t.id = ANY($1) AND t.claim_token = ANY($2) AND t.state = 'running'
                 RETURNING order_id, order_version
             ),
             {UNPARK}
             SELECT count(*) FROM left_running"
        ))
        .bind(ids)
        .bind(tokens)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(done).unwrap_or(0))
    }

    /// Puts a claimed task back to `pending` until `run_at`, keeping the
    /// error. With `in_doubt_until`, 1C may still apply this attempt, so no
    /// newer version of the order is claimed before then. False if the
    /// claim was lost.
    pub async fn retry_later(
        &self,
        id: TaskId,
        token: ClaimToken,
        run_at: DateTime<Utc>,
        error: &str,
        in_doubt_until: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let sql = fenced(
            "state = 'pending', run_at = $3, last_error = $4,
             in_doubt_until = greatest(in_doubt_until, $5)",
        );
        self.run_fenced(
            sqlx::query(&sql)
                .bind(id.0)
                .bind(token.0)
                .bind(run_at)
                .bind(error)
                .bind(in_doubt_until),
        )
        .await
    }

    /// Buries a claimed task as `dead` with its error; `in_doubt_until` as
    /// in [`Store::retry_later`]. False if the claim was lost.
    pub async fn mark_dead(
        &self,
        id: TaskId,
        token: ClaimToken,
        error: &str,
        in_doubt_until: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let sql = fenced(
            "state = 'dead', finished_at = now(), last_error = $3,
             in_doubt_until = greatest(in_doubt_until, $4)",
        );
        self.run_fenced(
            sqlx::query(&sql)
                .bind(id.0)
                .bind(token.0)
                .bind(error)
                .bind(in_doubt_until),
        )
        .await
    }

    /// Gives a claimed task back untried, e.g. on shutdown: it is pending
    /// again at once and the attempt it was charged is refunded.
    pub async fn release(&self, id: TaskId, token: ClaimToken) -> Result<bool> {
        let sql = fenced("state = 'pending', run_at = now(), attempts = greatest(attempts - 1, 0)");
        self.run_fenced(sqlx::query(&sql).bind(id.0).bind(token.0))
            .await
    }

    async fn run_fenced(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool> {
        Ok(query.fetch_optional(&self.pool).await?.is_some())
    }

    /// Tasks in `state`, oldest first, after task id `after`.
    pub async fn list_tasks(
        &self,
        state: TaskState,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskSummary>> {
        let rows: Vec<SummaryRow> = sqlx::query_as(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM onec_tasks
             WHERE state = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(state.as_str())
        .bind(after.map_or(0, |t| t.0))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Replays a dead task: pending again now, with a fresh attempt budget,
    /// and the relays are woken. Refused when a newer version of the order
    /// was queued since, because 1C must never go back to an older version.
    pub async fn retry_task(&self, id: TaskId) -> Result<TaskSummary> {
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, i64, String)> = sqlx::query_as(
            "SELECT order_id, order_version, state FROM onec_tasks WHERE id = $1 FOR UPDATE",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((order_id, version, state)) = found else {
            return Err(Error::TaskNotFound(id));
        };
        if state != TaskState::Dead.as_str() {
            return Err(Error::TaskNotReplayable {
                id,
                reason: format!("it is {state}, and only dead tasks can be replayed"),
            });
        }
        // Any newer version, whatever became of it (dead included), means
        // 1C must not get this one: replaying it would roll 1C back.
        let newer: Option<(i64, i64, String)> = sqlx::query_as(
            "SELECT id, order_version, state FROM onec_tasks
             WHERE order_id = $1 AND order_version > $2
             ORDER BY order_version DESC LIMIT 1",
        )
        .bind(&order_id)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((newer_id, newer, newer_state)) = newer {
            return Err(Error::TaskNotReplayable {
                id,
                reason: format!(
                    "version {newer} of order {order_id} was queued after it \
                     (task {newer_id}, {newer_state}); replay that one instead"
                ),
            });
        }
        let task: SummaryRow = sqlx::query_as(&format!(
            "UPDATE onec_tasks SET state = 'pending', attempts = 0, run_at = now(),
                 finished_at = NULL, updated_at = now()
             WHERE id = $1 RETURNING {SUMMARY_COLUMNS}"
        ))
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await?;
        crate::outbox::notify(&mut tx).await?;
        tx.commit().await?;
        Ok(task.into())
    }
}

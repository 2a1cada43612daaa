//! The claim engine's SQL over the outbox: claiming, completing, retrying,
//! releasing and burying tasks of one destination under its delivery
//! policy, plus listing and replaying them.
//!
//! Every transition out of `running` is fenced by the claim token, so a
//! worker whose claim expired and was taken over can never overwrite the
//! newer outcome.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{DeliveryPolicy, Destination, TaskState, TaskSummary};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use crate::{Error, Result, Store};

/// Id of an outbox row: one event for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Id of an event, shared by every destination's copy of it; consumers
/// deduplicate on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The proof of one claim. A new one is drawn for every claim, so only the
/// current claimant can complete, retry, release or bury the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken {
    /// The claim's token, written to the claimed row.
    pub uuid: Uuid,
    /// The task rides in its key's run behind the run's head, and is held
    /// through the head's claim: only the head is written `running` (which
    /// keeps every other claimer off the key), the rest stay `pending` until
    /// their outcome, so a run of n messages costs one claim write, not n.
    pub via_head: bool,
}

impl ClaimToken {
    /// The token of a task claimed in its own right.
    pub fn own(uuid: Uuid) -> Self {
        Self {
            uuid,
            via_head: false,
        }
    }
}

/// A task claimed for delivery.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    /// The task.
    pub id: TaskId,
    /// The event it carries.
    pub event_id: EventId,
    /// Debezium's `aggregatetype`, e.g. `order`.
    pub aggregate_type: String,
    /// Debezium's `aggregateid`: the key whose messages keep their order.
    pub aggregate_id: String,
    /// The event, e.g. `order.updated`.
    pub kind: String,
    /// The aggregate's version the event belongs to.
    pub version: i64,
    /// The event's payload (for order saves, the OrderFull as committed),
    /// as JSON text: the relay passes it on without parsing it.
    pub payload: Box<serde_json::value::RawValue>,
    /// Attempts including this one.
    pub attempts: i32,
    /// Fences every outcome of this claim.
    pub token: ClaimToken,
    /// W3C trace context of the save.
    pub traceparent: Option<String>,
    /// When the event committed; the start of the commit-to-delivery lag.
    pub created_at: DateTime<Utc>,
}

impl ClaimedTask {
    /// The payload parsed, for a caller that needs to look inside.
    pub fn payload_json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_str(self.payload.get())
    }
}

/// Claim settings.
#[derive(Debug, Clone)]
pub struct ClaimSpec<'a> {
    /// Whose tasks.
    pub destination: &'a Destination,
    /// How that destination wants one key's messages.
    pub policy: DeliveryPolicy,
    /// Written to `claimed_by`, for operators.
    pub claimant: &'a str,
    /// Most tasks to claim.
    pub limit: u32,
    /// How long the claim holds before any relay may rescue it.
    pub lease: Duration,
}

/// The claim engine's statements. Public so that the bench can run exactly
/// these through pgbench, as the SQL-only ceiling of a drain.
pub mod sql {
    use std::sync::LazyLock;

    use domain::DeliveryPolicy;

    use super::{BEHIND, UNPARK};

    /// Locks up to `$1` due pending rows of destination `$2` under `policy`,
    /// skipping locked ones, and tries each row's key lock: `(key, mine)`
    /// per row.
    pub fn candidates(policy: DeliveryPolicy) -> &'static str {
        match policy {
            DeliveryPolicy::LatestWins => &CANDIDATES_LATEST,
            DeliveryPolicy::EveryMessageInOrder => &CANDIDATES_IN_ORDER,
        }
    }

    static CANDIDATES_LATEST: LazyLock<String> = LazyLock::new(|| candidates_statement(""));
    // A run's tail stays pending and due while its head runs; a key that
    // runs is skipped, read only (the running keys are read once into a
    // hashed set), instead of taking a candidate slot and being parked (a
    // write) by every claim meanwhile.
    static CANDIDATES_IN_ORDER: LazyLock<String> = LazyLock::new(|| {
        candidates_statement(
            "AND aggregateid NOT IN (
                 SELECT aggregateid FROM outbox WHERE destination = $2 AND state = 'running'
             )",
        )
    });

    fn candidates_statement(filter: &str) -> String {
        format!(
            "SELECT c.aggregateid AS key,
                    pg_try_advisory_xact_lock(hashtext($2), hashtext(c.aggregateid)) AS mine
             FROM (
                 SELECT aggregateid FROM outbox
                 WHERE destination = $2 AND state = 'pending' AND run_at <= now() {filter}
                 ORDER BY run_at, id
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED
             ) c"
        )
    }

    /// Claims, under `policy`, the heads of the locked keys `$1` (text[])
    /// of destination `$4` for claimant `$2` with a lease of `$3` seconds.
    /// One row per claimed task, or one row of NULLs; every row carries the
    /// superseded count. See [`Store::claim_batch`](crate::Store::claim_batch).
    pub fn claim(policy: DeliveryPolicy) -> &'static str {
        match policy {
            DeliveryPolicy::LatestWins => &CLAIM_LATEST,
            DeliveryPolicy::EveryMessageInOrder => &CLAIM_IN_ORDER,
        }
    }

    static CLAIM_LATEST: LazyLock<String> =
        LazyLock::new(|| claim_statement(DeliveryPolicy::LatestWins));
    static CLAIM_IN_ORDER: LazyLock<String> =
        LazyLock::new(|| claim_statement(DeliveryPolicy::EveryMessageInOrder));

    /// One statement per policy, from shared parts, so neither pays at run
    /// time for the other's steps.
    fn claim_statement(policy: DeliveryPolicy) -> String {
        let latest = policy == DeliveryPolicy::LatestWins;
        // A message's place in its lane: its version under latest wins (a
        // snapshot restored late is still old), its write order otherwise.
        let (pos, rank, head_pos) = if latest {
            ("t.version", "t.version DESC", "max(t.version)")
        } else {
            ("t.id", "t.id", "min(t.id)")
        };
        // Under latest wins nothing goes that is older than what was sent.
        let above_floor = if latest {
            "(l.floor IS NULL OR l.head_pos > l.floor)"
        } else {
            "true"
        };
        let head_run_at = if latest {
            "NULL::timestamptz".to_owned()
        } else {
            format!("(array_agg(t.run_at ORDER BY {rank}) FILTER (WHERE t.state = 'pending'))[1]")
        };
        // Which lanes' heads go now. Under latest wins the head's own due
        // time is checked when it is locked; in order, only the head is
        // locked and written: while it runs, its key is busy for every
        // other claimer, which holds the rest of its run (see `run_tails`),
        // so a burst on one key costs one claim write instead of one each.
        let head_goes = if latest {
            format!("NOT l.busy AND {above_floor} AND (l.doubt IS NULL OR l.head_pos <= l.doubt)")
        } else {
            "l.free".to_owned()
        };
        let heads = format!(
            "heads AS (
                 SELECT h.id FROM lanes l
                 CROSS JOIN LATERAL (
                     SELECT id FROM outbox
                     WHERE id = l.head AND state = 'pending' AND run_at <= now()
                     FOR UPDATE SKIP LOCKED
                 ) h
                 WHERE {head_goes}
             )"
        );
        let run_tails = if latest {
            "run_tails AS (SELECT * FROM claimed WHERE false)"
        } else {
            // The rest of each claimed head's run, as it stands in this
            // statement's snapshot: pending, and charged this attempt only
            // when its outcome is recorded.
            "run_tails AS (
                 SELECT t.id, t.event_id, t.aggregatetype, t.aggregateid, t.type, t.version,
                        t.payload, t.attempts + 1 AS attempts, c.claim_token, t.traceparent,
                        t.created_at, true AS via_head
                 FROM claimed c
                 JOIN lanes l ON l.head = c.id
                 CROSS JOIN LATERAL unnest(l.pending[2:16]) AS v(id)
                 JOIN outbox t ON t.id = v.id
             )"
        };
        let older = if latest {
            // Every pending version but the newest, or all of them when
            // something newer was already sent.
            "older AS (
                 SELECT o.id FROM lanes l
                 CROSS JOIN LATERAL unnest(
                     CASE WHEN l.head_pos <= l.floor THEN l.pending ELSE l.pending[2:] END
                 ) AS v(id)
                 CROSS JOIN LATERAL (
                     SELECT id FROM outbox WHERE id = v.id AND state = 'pending'
                     FOR UPDATE SKIP LOCKED
                 ) o
             )"
        } else {
            "older AS (SELECT NULL::bigint AS id WHERE false)"
        };
        let behind = if latest {
            "behind AS (SELECT NULL::bigint AS id, NULL::timestamptz AS until WHERE false)"
        } else {
            // The messages behind a head (or behind its run, when it goes
            // now) wait for it the way a head waits for its blocker: until
            // it can have gone (its backoff, a doubt, or at most a second),
            // unparked as soon as it leaves `running`.
            "behind AS (
                 SELECT b.id, b.until FROM lanes l
                 CROSS JOIN LATERAL unnest(
                     CASE WHEN l.free THEN l.pending[17:] ELSE l.pending[2:] END,
                     CASE WHEN l.free THEN l.pending_xmin[17:] ELSE l.pending_xmin[2:] END
                 ) AS v(id, x)
                 CROSS JOIN LATERAL (
                     SELECT id, greatest(l.head_run_at, now() + interval '1 second',
                                         l.doubt_until) AS until
                     FROM outbox
                     WHERE id = v.id AND state = 'pending' AND xmin = v.x
                       AND run_at < greatest(l.head_run_at, now() + interval '1 second',
                                             l.doubt_until)
                     FOR UPDATE SKIP LOCKED
                 ) b
             )"
        };
        format!(
            "WITH lanes AS (
                 SELECT a.*, a.pending[1] AS head, a.pending_xmin[1] AS head_xmin,
                        -- The head may go now.
                        NOT a.busy AND a.head_run_at <= now()
                            AND (a.doubt IS NULL OR a.head_pos <= a.doubt) AS free,
                        -- Behind a running message, at most a second: a
                        -- completion whose snapshot predates a new message
                        -- cannot unpark it, so a missed wake-up costs no more.
                        CASE WHEN a.busy THEN least(a.busy_until, now() + interval '1 second')
                             ELSE a.doubt_until END AS blocked_until
                 FROM unnest($1::text[]) AS o(key)
                 CROSS JOIN LATERAL (
                     SELECT bool_or(t.state = 'running') AS busy,
                            max(t.claim_expires_at) AS busy_until,
                            max(t.in_doubt_until) AS doubt_until,
                            max({pos}) FILTER (WHERE t.state IN ('running', 'done')) AS floor,
                            max({pos}) FILTER (WHERE t.in_doubt_until > now()) AS doubt,
                            {head_pos} FILTER (WHERE t.state = 'pending') AS head_pos,
                            {head_run_at} AS head_run_at,
                            array_agg(t.id ORDER BY {rank}) FILTER (WHERE t.state = 'pending')
                                AS pending,
                            array_agg(t.xmin ORDER BY {rank}) FILTER (WHERE t.state = 'pending')
                                AS pending_xmin
                     FROM outbox t WHERE t.destination = $4 AND t.aggregateid = o.key
                 ) a
             ),
             {heads},
             {older},
             -- A head that cannot go now (its key runs elsewhere, or an
             -- older message may still land) waits until the blocker can
             -- end, out of the candidate pages, so it never crowds out
             -- unrelated keys. Leaving `running` brings it back at once
             -- (UNPARK). That rewrites the head even when it was not parked
             -- yet, so if it does so after this snapshot, the xmin check
             -- fails on recheck and the head is not parked behind a blocker
             -- that is already gone.
             stuck AS (
                 SELECT h.id, l.blocked_until AS until FROM lanes l
                 CROSS JOIN LATERAL (
                     SELECT id FROM outbox
                     WHERE id = l.head AND state = 'pending' AND xmin = l.head_xmin
                       AND run_at < l.blocked_until
                     FOR UPDATE SKIP LOCKED
                 ) h
                 WHERE {above_floor} AND (l.busy OR l.head_pos > l.doubt)
             ),
             {behind},
             -- Every row this statement writes was locked with SKIP LOCKED
             -- above, so a claim never waits on a row lock: it cannot
             -- deadlock with completions unparking the same keys. A row it
             -- skips stays due and is looked at again by the next claim.
             waits AS (SELECT * FROM stuck UNION ALL SELECT * FROM behind),
             parked AS (
                 UPDATE outbox SET run_at = w.until
                 FROM waits w
                 WHERE outbox.id = w.id AND outbox.id = ANY(ARRAY(SELECT id FROM waits))
             ),
             superseded AS (
                 UPDATE outbox
                 SET state = 'superseded', finished_at = now(), updated_at = now()
                 WHERE id = ANY(ARRAY(SELECT id FROM older))
                 RETURNING id
             ),
             claimed AS (
                 UPDATE outbox
                 SET state = 'running', attempts = attempts + 1, claimed_by = $2,
                     claim_token = gen_random_uuid(),
                     claim_expires_at = now() + make_interval(secs => $3),
                     updated_at = now()
                 WHERE id = ANY(ARRAY(SELECT id FROM heads))
                 RETURNING id, event_id, aggregatetype, aggregateid, type, version, payload,
                           attempts, claim_token, traceparent, created_at, false AS via_head
             ),
             {run_tails},
             claims AS (SELECT * FROM claimed UNION ALL SELECT * FROM run_tails)
             SELECT (SELECT count(*) FROM superseded) AS superseded, c.*
             FROM (SELECT 1) one LEFT JOIN claims c ON true"
        )
    }

    /// Marks the running tasks `$1` (bigint[]) done, each fenced by its own
    /// token in `$2` (uuid[]), and with them the run tails `$3` (bigint[])
    /// whose head this very statement completes; unparks what waited
    /// behind them. Returns how many claims were still held.
    pub static COMPLETE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH settled AS (
                 UPDATE outbox t
                 SET state = 'done', finished_at = now(), last_error = NULL, claim_token = NULL,
                     claim_expires_at = NULL, claimed_by = NULL, updated_at = now()
                 WHERE t.id = ANY($1) AND t.claim_token = ANY($2)
                 RETURNING t.destination, t.aggregateid, t.id
             ),
             {BEHIND},
             tails AS (
                 UPDATE outbox t
                 SET state = 'done', attempts = t.attempts + 1, finished_at = now(),
                     last_error = NULL, updated_at = now()
                 WHERE t.id = ANY(ARRAY(SELECT id FROM behind WHERE id = ANY($3)))
                 RETURNING t.id
             ),
             {UNPARK}
             SELECT (SELECT count(*) FROM settled) + (SELECT count(*) FROM tails)"
        )
    });
}

/// A statement that leaves `running` for the claim `$1` (task id), `$2`
/// (token), returning one row if the claim was still held. Leaving `running`
/// always drops the claim: the CHECK constraint keeps `running` and the claim
/// fields in step, so the token alone fences. It also unparks the key's
/// newer messages.
fn fenced(set: &str) -> String {
    format!(
        "WITH settled AS (
             UPDATE outbox SET {set}, claim_token = NULL, claim_expires_at = NULL,
                 claimed_by = NULL, updated_at = now()
             WHERE id = $1 AND claim_token = $2
             RETURNING destination, aggregateid, id
         ),
         {BEHIND},
         tails AS (SELECT NULL::bigint AS id WHERE false),
         {UNPARK}
         SELECT 1 FROM settled"
    )
}

/// The statement that records an outcome under `token`'s fence.
fn fence(token: ClaimToken, set: &str) -> String {
    if token.via_head {
        fenced_tail(set)
    } else {
        fenced(set)
    }
}

/// The same for a run's tail `$1`, fenced by its head's claim `$2`: the
/// key's running message must still hold that token. The head is locked
/// while the tail is written, so a rescue of the head cannot slip between
/// the check and the write. Nothing is unparked: the head still runs, and
/// its completion does that.
fn fenced_tail(set: &str) -> String {
    format!(
        "WITH head AS (
             SELECT h.id FROM outbox t
             JOIN outbox h ON h.destination = t.destination AND h.aggregateid = t.aggregateid
             WHERE t.id = $1 AND h.state = 'running' AND h.claim_token = $2
             FOR SHARE OF h
         )
         UPDATE outbox SET {set}, attempts = attempts + 1, updated_at = now()
         WHERE id = $1 AND state = 'pending' AND EXISTS (SELECT 1 FROM head)
         RETURNING 1"
    )
}

/// A CTE of the pending messages behind the rows of `settled`, in their
/// keys, as this statement's snapshot has them.
///
/// Statistics taken before a burst make the pending index look empty and
/// the table small, so any plan that may use that index or a scan of the
/// table looks cheap; one completion then read every pending row of its
/// destination (12 ms each, most of PostgreSQL's time in the saga
/// benchmark). So a key's rows are read through its own index only (the
/// `OFFSET 0` fence keeps `state = 'pending'` away from the planner's
/// choice of index), and the rows written are named by id (`= ANY`, which
/// only the primary key serves). Matching them by id alone is enough:
/// while the settled message still runs, no other claim can take them (its
/// key is busy), and a claim that parks one meanwhile is overridden, as it
/// should be.
const BEHIND: &str = "behind AS MATERIALIZED (
             SELECT k.id, k.attempts FROM settled l
             CROSS JOIN LATERAL (
                 SELECT id, destination, state, attempts FROM outbox
                 WHERE aggregateid = l.aggregateid OFFSET 0
             ) k
             WHERE k.destination = l.destination AND k.id > l.id AND k.state = 'pending'
         )";

/// A CTE that makes the messages parked behind the rows of `settled` due
/// now: a claim parked them for up to a second, but the key is free as soon
/// as its running message is done with. Each is rewritten even when not
/// parked, which fences a claim that is about to park it (the xmin checks in
/// [`Store::claim_batch`]). Left alone: the run tails done in the same
/// statement (`tails`), and messages already tried, whose `run_at` is their
/// own backoff (a run's message that failed behind a head that went).
const UNPARK: &str = "unparked AS (
             UPDATE outbox SET run_at = least(run_at, now())
             WHERE id = ANY(ARRAY(
                 SELECT id FROM behind WHERE attempts = 0 AND id NOT IN (SELECT id FROM tails)
             ))
         )";

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: i64,
    #[sqlx(try_from = "String")]
    destination: Destination,
    #[sqlx(rename = "type")]
    kind: String,
    aggregateid: String,
    version: i64,
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
            destination: r.destination,
            kind: r.kind,
            order_id: r.aggregateid,
            version: r.version,
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

const SUMMARY_COLUMNS: &str = "id, destination, type, aggregateid, version, state, attempts, \
                               run_at, claimed_by, last_error, created_at, updated_at";

/// [`SUMMARY_COLUMNS`] of a `log_dead` row: dead, its class and reason as
/// the last error.
const LOG_DEAD_COLUMNS: &str = "id, destination, type, aggregateid, version, 'dead' AS state, \
                                0 AS attempts, dead_at AS run_at, NULL::text AS claimed_by, \
                                class || ': ' || reason AS last_error, dead_at AS created_at, \
                                dead_at AS updated_at";

/// What one claim did.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// Tasks now held by this relay.
    pub tasks: Vec<ClaimedTask>,
    /// Older pending versions that newer ones superseded (latest wins).
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
    event_id: Option<Uuid>,
    aggregatetype: Option<String>,
    aggregateid: Option<String>,
    #[sqlx(rename = "type")]
    kind: Option<String>,
    version: Option<i64>,
    payload: Option<Json<Box<serde_json::value::RawValue>>>,
    attempts: Option<i32>,
    claim_token: Option<Uuid>,
    traceparent: Option<String>,
    created_at: Option<DateTime<Utc>>,
    via_head: Option<bool>,
}

impl Store {
    /// Claims tasks of one destination from up to `spec.limit` candidates in
    /// one short transaction. A key is an aggregate id (an order): only one
    /// claim of it is ever running, and no message is sent after a newer one.
    ///
    /// 1. Due pending rows are locked `FOR UPDATE SKIP LOCKED`, so concurrent
    ///    relays take disjoint candidates, and each candidate's key is locked
    ///    with a transaction-scoped advisory lock (safe behind PgBouncer).
    /// 2. A second statement, whose snapshot is taken only after those locks
    ///    are held and so sees every committed claim of those keys, claims
    ///    for each locked key its head: the newest pending message under
    ///    *latest wins*; under *every message in order*, the oldest and up
    ///    to 15 behind it, to be sent one after another by one worker (only
    ///    the head is written `running`; see [`ClaimToken::via_head`]). Only
    ///    if the key has nothing running, the head is due, and no older
    ///    message is still in doubt (the destination may yet apply a
    ///    timed-out attempt). Under latest wins, older pending messages
    ///    become `superseded`, and so does a head older than one already
    ///    delivered.
    pub async fn claim_batch(&self, spec: &ClaimSpec<'_>) -> Result<Claimed> {
        let mut tx = self.pool.begin().await?;
        // One row per candidate, so a full page says more may be waiting
        // even when several candidates share a key.
        let candidates: Vec<(String, bool)> = sqlx::query_as(sql::candidates(spec.policy))
            .bind(i64::from(spec.limit))
            .bind(spec.destination.as_str())
            .fetch_all(&mut *tx)
            .await?;
        let more = candidates.len() >= spec.limit as usize;
        let mut keys: Vec<String> = candidates
            .into_iter()
            .filter_map(|(key, mine)| mine.then_some(key))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            tx.commit().await?;
            return Ok(Claimed {
                more,
                ..Claimed::default()
            });
        }

        // Every step reads by key: a key's lane, then one id per lock. So no
        // plan can scan the pending set (a hash join, or a bitmap AND with
        // the claimable index, costs O(backlog) per claim), and each lock
        // sits in its own subquery, so PostgreSQL need not carry whole-row
        // copies of a joined CTE for rechecks. `pending` lists a lane's
        // pending ids head first: newest first under latest wins ($4), oldest
        // first under every message in order.
        let rows: Vec<ClaimedRow> = sqlx::query_as(sql::claim(spec.policy))
            .bind(&keys)
            .bind(spec.claimant)
            .bind(spec.lease.as_secs_f64())
            .bind(spec.destination.as_str())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let superseded = rows.first().map_or(0, |r| r.superseded as u64);
        let tasks = rows
            .into_iter()
            .filter_map(|r| {
                Some(ClaimedTask {
                    id: TaskId(r.id?),
                    event_id: EventId(r.event_id?),
                    aggregate_type: r.aggregatetype?,
                    aggregate_id: r.aggregateid?,
                    kind: r.kind?,
                    version: r.version?,
                    payload: r.payload?.0,
                    attempts: r.attempts?,
                    token: ClaimToken {
                        uuid: r.claim_token?,
                        via_head: r.via_head?,
                    },
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

    /// Whether `destination` has anything left to deliver: a pending task,
    /// due or not, or one running on some relay.
    pub async fn has_undelivered(&self, destination: &Destination) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE destination = $1 AND state = 'pending')
                 OR EXISTS (SELECT 1 FROM outbox WHERE destination = $1 AND state = 'running')",
        )
        .bind(destination.as_str())
        .fetch_one(&self.pool)
        .await?)
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
        let (tails, heads): (Vec<_>, Vec<_>) = claims.iter().partition(|(_, t)| t.via_head);
        let ids: Vec<i64> = heads.iter().map(|(id, _)| id.0).collect();
        let tokens: Vec<Uuid> = heads.iter().map(|(_, token)| token.uuid).collect();
        let tails: Vec<i64> = tails.iter().map(|(id, _)| id.0).collect();
        let done: i64 = sqlx::query_scalar(sql::COMPLETE.as_str())
            .bind(ids)
            .bind(tokens)
            .bind(tails)
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
        let sql = fence(
            token,
            "state = 'pending', run_at = $3, last_error = $4,
             in_doubt_until = greatest(in_doubt_until, $5)",
        );
        self.run_fenced(
            sqlx::query(&sql)
                .bind(id.0)
                .bind(token.uuid)
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
        let sql = fence(
            token,
            "state = 'dead', finished_at = now(), last_error = $3,
             in_doubt_until = greatest(in_doubt_until, $4)",
        );
        self.run_fenced(
            sqlx::query(&sql)
                .bind(id.0)
                .bind(token.uuid)
                .bind(error)
                .bind(in_doubt_until),
        )
        .await
    }

    /// Gives a claimed task back untried, e.g. on shutdown: it is pending
    /// again at once and the attempt it was charged is refunded. A run's
    /// tail was never written, so there is nothing to give back.
    pub async fn release(&self, id: TaskId, token: ClaimToken) -> Result<bool> {
        if token.via_head {
            return Ok(true);
        }
        let sql = fenced("state = 'pending', run_at = now(), attempts = greatest(attempts - 1, 0)");
        self.run_fenced(sqlx::query(&sql).bind(id.0).bind(token.uuid))
            .await
    }

    async fn run_fenced(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool> {
        Ok(query.fetch_optional(&self.pool).await?.is_some())
    }

    /// Tasks in `state`, of one destination or all, oldest first, after
    /// task id `after`. Dead ones include the log's events buried in
    /// `log_dead` and not replayed: their ids come from the same sequence.
    pub async fn list_tasks(
        &self,
        destination: Option<&Destination>,
        state: TaskState,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskSummary>> {
        let log_dead = if state == TaskState::Dead {
            format!(
                "UNION ALL SELECT {LOG_DEAD_COLUMNS} FROM log_dead
                 WHERE replayed_at IS NULL AND id > $2 AND ($4::text IS NULL OR destination = $4)"
            )
        } else {
            String::new()
        };
        let rows: Vec<SummaryRow> = sqlx::query_as(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM outbox
             WHERE state = $1 AND id > $2 AND ($4::text IS NULL OR destination = $4)
             {log_dead}
             ORDER BY id LIMIT $3"
        ))
        .bind(state.as_str())
        .bind(after.map_or(0, |t| t.0))
        .bind(i64::from(limit))
        .bind(destination.map(Destination::as_str))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Replays a dead task: pending again now, with a fresh attempt budget,
    /// and the relays are woken. Refused when a newer message of the same
    /// key was queued for the destination since, under either policy: a
    /// snapshot destination must never go back to an older version, and an
    /// ordered stream must never get a message after a newer one.
    pub async fn retry_task(&self, id: TaskId) -> Result<TaskSummary> {
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, String, i64, String)> = sqlx::query_as(
            "SELECT destination, aggregateid, version, state FROM outbox WHERE id = $1 FOR UPDATE",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((destination, order_id, version, state)) = found else {
            tx.rollback().await?;
            return self.replay_log_dead(id).await;
        };
        if state != TaskState::Dead.as_str() {
            return Err(Error::TaskNotReplayable {
                id,
                reason: format!("it is {state}, and only dead tasks can be replayed"),
            });
        }
        // Any newer message, whatever became of it (dead included), means
        // the destination must not get this one: it would go back in time.
        let newer: Option<(i64, i64, String)> = sqlx::query_as(
            "SELECT id, version, state FROM outbox
             WHERE destination = $1 AND aggregateid = $2 AND (version > $3 OR id > $4)
             ORDER BY id DESC LIMIT 1",
        )
        .bind(&destination)
        .bind(&order_id)
        .bind(version)
        .bind(id.0)
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
            "UPDATE outbox SET state = 'pending', attempts = 0, run_at = now(),
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

    /// Replays an event of the log buried in `log_dead`: appended to the log
    /// again, with its event id, so its partition's cursor reaches it after
    /// the key's newer events (the consumers' inboxes drop a copy that did
    /// arrive), and marked replayed.
    async fn replay_log_dead(&self, id: TaskId) -> Result<TaskSummary> {
        let mut tx = self.pool.begin().await?;
        #[derive(sqlx::FromRow)]
        struct Buried {
            #[sqlx(flatten)]
            summary: SummaryRow,
            aggregatetype: String,
            event_id: Uuid,
            payload: serde_json::Value,
            traceparent: Option<String>,
            replayed_at: Option<DateTime<Utc>>,
        }
        let found: Option<Buried> = sqlx::query_as(&format!(
            "SELECT {LOG_DEAD_COLUMNS}, aggregatetype, event_id, payload, traceparent, replayed_at
             FROM log_dead WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(b) = found else {
            return Err(Error::TaskNotFound(id));
        };
        if let Some(at) = b.replayed_at {
            return Err(Error::TaskNotReplayable {
                id,
                reason: format!("it was replayed at {at}; that copy went back to the log"),
            });
        }
        let row = b.summary;
        crate::log::append(
            &mut tx,
            &[crate::log::Append {
                destination: &row.destination,
                stream: &b.aggregatetype,
                key: &row.aggregateid,
                kind: &row.kind,
                version: row.version,
                event_id: b.event_id,
                payload: &b.payload,
                traceparent: b.traceparent.as_deref(),
            }],
        )
        .await?;
        sqlx::query("UPDATE log_dead SET replayed_at = now() WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        crate::outbox::notify(&mut tx).await?;
        tx.commit().await?;
        Ok(TaskSummary {
            state: TaskState::Pending,
            run_at: Utc::now(),
            updated_at: Utc::now(),
            ..row.into()
        })
    }
}

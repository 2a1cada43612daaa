//! The saga's SQL in the orders database: starting a saga with its order,
//! applying an answer or a passed deadline through the pure
//! [`saga::transition`], and reading the state chain.
//!
//! Every write happens in the caller's transaction (the order save, or the
//! orchestrator's inbox transaction), so the saga row, its chain, the new
//! order version and the commands it sends commit together or not at all.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{Destination, Money, OrderId, StatusChange};
use saga::{Command, Deadline, Event, Kind, Line, SagaMessage, State, Step, Topic, Transition};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::orders::ChangedBy;
use crate::outbox::{write_events, OutboxEvent};
use crate::{Error, Precondition, Result, SaveContext, Store};

/// Where the saga's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaRoute {
    /// The PostgreSQL transport: to each reader of a message as a
    /// destination (`inventory`, `payments`, `saga`, `notifier`).
    Local,
    /// Every topic to this broker destination (`kafka`, `rabbitmq`).
    Broker(Destination),
}

impl SagaRoute {
    /// The outbox destinations of `kind`'s messages.
    pub fn destinations(&self, kind: Kind) -> Vec<Destination> {
        match self {
            SagaRoute::Local => kind
                .readers()
                .iter()
                .map(|r| r.parse().expect("readers are destination names"))
                .collect(),
            SagaRoute::Broker(d) => vec![d.clone()],
        }
    }

    /// The outbox destinations of every message of `topics`.
    pub fn destinations_of(&self, topics: &[Topic]) -> Vec<Destination> {
        let mut all: Vec<Destination> = topics
            .iter()
            .flat_map(|t| t.kinds())
            .flat_map(|k| self.destinations(k))
            .collect();
        all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        all.dedup();
        all
    }
}

/// How sagas run.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// Where their messages go; `None` when this deployment runs no sagas
    /// (no broker outside `dev`), and a checkout is refused.
    pub route: Option<SagaRoute>,
    /// How long a step may go unanswered before compensation (or, once
    /// paid, a resend of the commit).
    pub step_timeout: Duration,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            route: None,
            step_timeout: Duration::from_secs(30),
        }
    }
}

/// One step of an order's state chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ChainStep {
    /// Seed 001's name, e.g. `RESERVE_CREATED`.
    #[schema(example = "RESERVE_CREATED")]
    pub step: String,
    /// The message (or deadline) that caused it.
    pub idempotency_key: String,
    /// Why, for failures and cancellations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The saga moved (or resent commands) to this state.
    Moved(State),
    /// The saga's state did not expect the event: nothing changed.
    Ignored(State),
    /// No saga has this order id.
    NoSaga,
}

struct Row {
    state: State,
    version: i64,
    account_id: String,
    amount: Money,
    lines: Vec<Line>,
    reason: Option<String>,
    /// The commands sent, as `<type>/<event id>`.
    sent: Vec<String>,
}

/// What an answer says of the command it answers.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    /// The command's type, by the answer's (`ChargePayment` for a
    /// `PaymentSucceeded`).
    pub command: Kind,
    /// The message id it names in `in_reply_to`.
    pub in_reply_to: Option<&'a str>,
    /// What a `PaymentSucceeded` says was charged.
    pub charged: Option<Money>,
}

/// The commands a transition sends, each with its event id.
fn with_ids(commands: &[Command]) -> Vec<(Command, Uuid)> {
    commands.iter().map(|c| (*c, Uuid::now_v7())).collect()
}

/// How `sent` names the commands that get answers (not the notifier's
/// outcomes): `<type>/<event id>`. A `ReserveStock` is also the charge
/// that payments' answers name.
fn sent_entries(commands: &[(Command, Uuid)]) -> Vec<String> {
    commands
        .iter()
        .flat_map(|(c, id)| {
            let kinds: &[Kind] = match c {
                Command::NotifyCompleted | Command::NotifyCancelled => &[],
                Command::Reserve => &[Kind::ReserveStock, Kind::ChargePayment],
                Command::Release => &[Kind::ReleaseStock],
                Command::Commit => &[Kind::CommitStock],
                Command::Refund => &[Kind::RefundPayment],
            };
            kinds.iter().map(move |k| format!("{k}/{id}"))
        })
        .collect()
}

/// Starts the saga of an order just created with `checkout`: the row, the
/// first chain step and the reservation command.
pub(crate) async fn start(
    conn: &mut PgConnection,
    config: &SagaConfig,
    order: &OrderId,
    amount: Money,
    checkout: &saga::Checkout,
) -> Result<()> {
    if config.route.is_none() {
        return Err(Error::SagasDisabled);
    }
    let first = saga::transition::start();
    let row = Row {
        state: first.state,
        version: 1,
        account_id: checkout.account_id.clone(),
        amount,
        lines: checkout.reserve.clone(),
        reason: None,
        sent: Vec::new(),
    };
    let commands = with_ids(&first.commands);
    let sent = sent_entries(&commands);
    sqlx::query(
        "INSERT INTO sagas (order_id, state, account_id, amount, lines, deadline_at, sent)
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7)",
    )
    .bind(order.as_str())
    .bind(first.state.as_str())
    .bind(&checkout.account_id)
    .bind(amount.0)
    .bind(Json(&checkout.reserve))
    .bind(config.step_timeout.as_secs_f64())
    .bind(&sent)
    .execute(&mut *conn)
    .await?;
    record(conn, order, &first.steps, &Uuid::now_v7().to_string(), None).await?;
    send_commands(conn, config, order, &row, &commands).await
}

/// Applies `event` (caused by message `cause`) to the saga of `order`
/// inside the caller's transaction: the transition, its chain steps, its
/// commands and, when the state changes, a new order version with the state
/// as its status, so it reaches 1C like any save.
async fn apply(
    conn: &mut PgConnection,
    store: &Store,
    order: &OrderId,
    event: &Event,
    cause: &str,
    reply: Option<Reply<'_>>,
) -> Result<Applied> {
    let Some(row) = lock(conn, order).await? else {
        return Ok(Applied::NoSaga);
    };
    if let Some(reply) = reply {
        check_reply(order, &row, &reply)?;
    }
    let Some(t) = saga::transition(row.state, event) else {
        return Ok(Applied::Ignored(row.state));
    };
    write(conn, store, order, &row, &t, cause).await?;
    if t.state.as_str() != row.state.as_str() {
        let change = StatusChange {
            status: t.state.as_str().to_owned(),
            user_id: "saga".into(),
        };
        let ctx = SaveContext {
            user_id: "saga".into(),
            ..SaveContext::default()
        };
        crate::orders::change_status_in(
            conn,
            store,
            order,
            &change,
            Precondition::None,
            &ctx,
            ChangedBy::Saga,
        )
        .await?;
    }
    Ok(Applied::Moved(t.state))
}

/// Refuses an answer that does not answer a command this saga sent, or a
/// charge of another amount than the one asked for.
fn check_reply(order: &OrderId, row: &Row, reply: &Reply<'_>) -> Result<()> {
    let mismatch = |detail: String| {
        Err(Error::AnswerMismatch {
            order: order.clone(),
            detail,
        })
    };
    // Sagas started before commands were recorded name none.
    if !row.sent.is_empty() {
        let named = reply.in_reply_to.unwrap_or_default();
        let entry = format!("{}/{named}", reply.command);
        if !row.sent.contains(&entry) {
            return mismatch(if named.is_empty() {
                format!(
                    "the answer names no command (in_reply_to); it answers a {}",
                    reply.command
                )
            } else {
                format!("the saga sent no {} with id {named}", reply.command)
            });
        }
    }
    match reply.charged {
        Some(charged) if charged != row.amount => mismatch(format!(
            "PaymentSucceeded carries {charged}; the saga asked for {}",
            row.amount
        )),
        _ => Ok(()),
    }
}

async fn lock(conn: &mut PgConnection, order: &OrderId) -> Result<Option<Row>> {
    type Raw = (
        String,
        bool,
        bool,
        i64,
        String,
        rust_decimal::Decimal,
        Json<Vec<Line>>,
        Option<String>,
        Vec<String>,
    );
    let raw: Option<Raw> = sqlx::query_as(
        "SELECT state, awaiting_release, awaiting_refund, version, account_id, amount, lines,
                reason, sent
         FROM sagas WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    raw.map(
        |(state, release, refund, version, account_id, amount, lines, reason, sent)| {
            Ok(Row {
                state: State::parse(&state, release, refund)
                    .ok_or_else(|| Error::Invariant(format!("saga state {state:?}")))?,
                version,
                account_id,
                amount: Money(amount),
                lines: lines.0,
                reason,
                sent,
            })
        },
    )
    .transpose()
}

async fn write(
    conn: &mut PgConnection,
    store: &Store,
    order: &OrderId,
    row: &Row,
    t: &Transition,
    cause: &str,
) -> Result<()> {
    let config = store.saga_config();
    let (release, refund) = t.state.awaiting();
    let reason = row.reason.clone().or_else(|| t.reason.clone());
    let next = Row {
        version: row.version + 1,
        reason: reason.clone(),
        state: t.state,
        account_id: row.account_id.clone(),
        amount: row.amount,
        lines: row.lines.clone(),
        sent: Vec::new(),
    };
    let commands = with_ids(&t.commands);
    let sent = sent_entries(&commands);
    let updated = sqlx::query(
        "UPDATE sagas SET state = $3, awaiting_release = $4, awaiting_refund = $5,
             version = version + 1, reason = coalesce(reason, $6),
             deadline_at = CASE WHEN $7 THEN now() + make_interval(secs => $8) END,
             finished_at = CASE WHEN $7 THEN NULL ELSE now() END, updated_at = now(),
             sent = sent || $9
         WHERE order_id = $1 AND version = $2",
    )
    .bind(order.as_str())
    .bind(row.version)
    .bind(t.state.as_str())
    .bind(release)
    .bind(refund)
    .bind(&t.reason)
    .bind(t.deadline == Deadline::Start)
    .bind(config.step_timeout.as_secs_f64())
    .bind(&sent)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if updated != 1 {
        // The row is locked for this transaction, so this is a bug.
        return Err(Error::Invariant(format!(
            "saga {order} changed under its lock"
        )));
    }
    let detail = t.reason.as_deref().or(match t.steps.last() {
        Some(Step::OrderCancelled) => reason.as_deref(),
        _ => None,
    });
    record(conn, order, &t.steps, cause, detail).await?;
    send_commands(conn, config, order, &next, &commands).await
}

/// Appends `steps` to the chain; a step already recorded stays as it was.
async fn record(
    conn: &mut PgConnection,
    order: &OrderId,
    steps: &[Step],
    cause: &str,
    detail: Option<&str>,
) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = steps.iter().map(|s| s.as_str()).collect();
    sqlx::query(
        "INSERT INTO order_states (order_id, step, idempotency_key, detail)
         SELECT $1, s.step, $3, CASE WHEN s.n = $5 THEN $4 END
         FROM unnest($2::text[]) WITH ORDINALITY AS s(step, n)
         ORDER BY s.n
         ON CONFLICT (order_id, step) DO NOTHING",
    )
    .bind(order.as_str())
    .bind(&names)
    .bind(cause)
    .bind(detail)
    .bind(names.len() as i64)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes `commands` to the outbox as saga messages, filled from `row`.
async fn send_commands(
    conn: &mut PgConnection,
    config: &SagaConfig,
    order: &OrderId,
    row: &Row,
    commands: &[(Command, Uuid)],
) -> Result<()> {
    let route = config.route.as_ref().ok_or(Error::SagasDisabled)?;
    let events: Vec<OutboxEvent> = commands
        .iter()
        .flat_map(|(c, id)| events(route, &message(order.as_str(), row, *c), row.version, *id))
        .collect();
    write_events(conn, &events).await
}

/// Writes one saga message (a service's answer) to the outbox along
/// `route`, keyed by its order.
pub async fn send(conn: &mut PgConnection, route: &SagaRoute, message: &SagaMessage) -> Result<()> {
    write_events(conn, &events(route, message, 1, Uuid::now_v7())).await
}

/// `message` as an event per destination, all under one id.
fn events(route: &SagaRoute, message: &SagaMessage, version: i64, id: Uuid) -> Vec<OutboxEvent> {
    let topic = message.kind.topic();
    let payload = message.to_json();
    route
        .destinations(message.kind)
        .into_iter()
        .map(|destination| OutboxEvent {
            event_id: id,
            destination,
            aggregate_type: topic.as_str(),
            aggregate_id: message.order_id.clone(),
            kind: message.kind.as_str(),
            version,
            payload: payload.clone(),
        })
        .collect()
}

fn message(order: &str, row: &Row, command: Command) -> SagaMessage {
    let plain = SagaMessage::new(command.kind(), order);
    match command {
        Command::Reserve => SagaMessage {
            lines: row.lines.clone(),
            account_id: Some(row.account_id.clone()),
            ..plain.amount(row.amount)
        },
        Command::Release | Command::Commit => plain,
        Command::Refund | Command::NotifyCompleted => plain.amount(row.amount),
        Command::NotifyCancelled => {
            plain.because(row.reason.clone().unwrap_or_else(|| "cancelled".into()))
        }
    }
}

impl Store {
    /// Applies `event`, caused by message `cause`, to the saga of `order` in
    /// the caller's transaction (the orchestrator's inbox transaction).
    /// An answer's `reply` must name a command the saga sent (and a
    /// charge its amount): otherwise [`Error::AnswerMismatch`].
    pub async fn apply_saga_event(
        &self,
        conn: &mut PgConnection,
        order: &OrderId,
        event: &Event,
        cause: &str,
        reply: Option<Reply<'_>>,
    ) -> Result<Applied> {
        apply(conn, self, order, event, cause, reply).await
    }

    /// Applies [`Event::DeadlinePassed`] to up to `limit` sagas whose step
    /// is overdue, each in its own transaction; answers how many.
    pub async fn pass_saga_deadlines(&self, limit: i64) -> Result<usize> {
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT order_id FROM sagas WHERE deadline_at <= now()
             ORDER BY deadline_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut passed = 0;
        for id in due {
            let id = OrderId::parse(&id).map_err(|e| Error::Invariant(format!("saga id: {e}")))?;
            let mut tx = self.pool.begin().await?;
            // Re-check under the row lock that the transition takes too: an
            // answer may have moved the saga on (and reset its deadline)
            // since the scan, and must not be compensated for.
            let overdue: bool = sqlx::query_scalar(
                "SELECT coalesce(deadline_at <= now(), false) FROM sagas WHERE order_id = $1
                 FOR UPDATE",
            )
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await?;
            if overdue {
                let cause = format!("deadline:{}", Uuid::now_v7());
                self.apply_saga_event(&mut tx, &id, &Event::DeadlinePassed, &cause, None)
                    .await?;
                passed += 1;
            }
            tx.commit().await?;
        }
        Ok(passed)
    }

    /// How many sagas are still running, and the age in seconds of the
    /// oldest of them (0 when none).
    pub async fn running_sagas(&self) -> Result<(i64, f64)> {
        Ok(sqlx::query_as(
            "SELECT count(*),
                    coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
             FROM sagas WHERE deadline_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// The order's state chain, oldest first; empty for an order without
    /// a saga.
    pub async fn order_states(&self, id: &OrderId) -> Result<Vec<ChainStep>> {
        let mut conn = self.pool.acquire().await?;
        if crate::orders::load(&mut conn, id).await?.is_none() {
            return Err(Error::NotFound(id.clone()));
        }
        let rows: Vec<(String, String, Option<String>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT step, idempotency_key, detail, at FROM order_states
             WHERE order_id = $1 ORDER BY at, id",
        )
        .bind(id.as_str())
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(step, idempotency_key, detail, at)| ChainStep {
                step,
                idempotency_key,
                detail,
                at,
            })
            .collect())
    }
}

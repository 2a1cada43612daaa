//! Consumers with an inbox. A transport (Kafka, RabbitMQ, or the outbox
//! itself in PostgreSQL) hands [`Inbox::process`] a batch of messages; each
//! decodable one is recorded as `(consumer, message id)` in `inbox` and its
//! effect applied in one transaction, so a redelivered message finds its row
//! and changes nothing. The transport acknowledges only after that commit:
//! delivery is at least once, the effect exactly once.
//!
//! A message that can never be applied (bad JSON, an unknown type, failed
//! validation) is a [`Poison`]: the transport moves it to its dead-letter
//! destination with the reason and goes on with the messages behind it.

pub mod journal;
pub mod local;
mod metrics;
pub mod saga;

use std::collections::HashSet;
use std::time::Instant;

use sqlx::{PgConnection, PgPool};

pub use metrics::ConsumerMetrics;

/// One message as a transport received it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The message id (Kafka's `event-id` header, AMQP's `message_id`, the
    /// outbox event id): the inbox key. A message without one is poison.
    pub id: Option<String>,
    /// The body.
    pub payload: Vec<u8>,
    /// Where it came from, for logs and dead letters, e.g. `order/2@1041`.
    pub origin: String,
    /// Its `signature` header, if any (`sink::signing`).
    pub signature: Option<String>,
}

/// Why a message can never be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {reason}")]
pub struct Poison {
    /// A stable label: `no_id`, `bad_json`, `unknown_type`, `invalid`,
    /// `unsigned`, `forged` or `apply_failed`.
    pub class: &'static str,
    /// What is wrong, for the dead letter.
    pub reason: String,
}

impl Poison {
    /// Every class.
    pub const CLASSES: [&'static str; 7] = [
        "no_id",
        "bad_json",
        "unknown_type",
        "invalid",
        "unsigned",
        "forged",
        "apply_failed",
    ];

    /// A poison of `class` for `reason`.
    pub fn new(class: &'static str, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
        }
    }
}

/// A dead letter the transport's dead-letter destination refused (a Kafka
/// broker refuses a record above its size limit), to be kept by the
/// consumer so it can acknowledge the message and go on.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// Where it was read, unique per consumer: `topic/partition@offset`.
    pub origin: &'a str,
    /// The message id, if it had one.
    pub message_id: Option<&'a str>,
    /// Why it can never be applied.
    pub poison: &'a Poison,
    /// Why the dead-letter destination refused it.
    pub refused: &'a str,
    /// The message key, if any.
    pub key: Option<&'a [u8]>,
    /// The body.
    pub payload: &'a [u8],
}

/// How much of a kept dead letter's key and body is stored.
pub const DEAD_LETTER_HEAD: usize = 64 * 1024;

/// What one consumer does with its messages.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// A decoded message.
    type Message: Send + Sync;

    /// Decodes and validates a message without touching the database, so
    /// that a poison never costs a transaction.
    fn decode(&self, incoming: &Incoming) -> Result<Self::Message, Poison>;

    /// Whether [`Handler::message_id`] finds the id in the body, so a
    /// message without a transport id is not poison by that alone.
    fn ids_from_body(&self) -> bool {
        false
    }

    /// The inbox key of a decoded message: by default the transport's id.
    fn message_id(&self, incoming: &Incoming, _message: &Self::Message) -> Option<String> {
        incoming.id.clone()
    }

    /// The key whose messages must apply in the order they came, e.g. the
    /// order id. Messages of different keys may then apply in separate
    /// transactions at once (see [`Inbox::with_transactions`]); without a
    /// key a batch is one transaction.
    fn ordering_key<'m>(&self, _message: &'m Self::Message) -> Option<&'m str> {
        None
    }

    /// Applies the effect inside the inbox transaction; follow-up events go
    /// to the outbox on the same connection.
    async fn apply(&self, conn: &mut PgConnection, message: &Self::Message) -> sqlx::Result<()>;

    /// Applies the new messages of a batch, in order, in its transaction.
    /// One by one unless a handler can do the batch in fewer statements.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[&Self::Message],
    ) -> sqlx::Result<()> {
        for m in messages {
            self.apply(conn, m).await?;
        }
        Ok(())
    }
}

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its effect committed now.
    Applied,
    /// Its id was in the inbox already: nothing changed.
    Duplicate,
    /// It can never be applied; the transport dead-letters it.
    Dead(Poison),
}

/// Errors of the inbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached or the transaction failed for a
    /// reason that is not the message's fault: retry the whole batch.
    #[error("inbox transaction: {0}")]
    Database(#[from] sqlx::Error),
    /// What the consumer passes its messages on to (a webhook) is away:
    /// retry the whole batch.
    #[error("{0}")]
    Downstream(String),
}

/// What a transport feeds: it hands over batches and acknowledges only
/// what `process` answered for. An [`Inbox`] is one; a consumer with no
/// database (the notifier) is another.
#[async_trait::async_trait]
pub trait Consumer: Send + Sync {
    /// The consumer's name: its group, queue and metric label.
    fn consumer(&self) -> &str;

    /// Its metrics.
    fn metrics(&self) -> &ConsumerMetrics;

    /// Applies a batch in order and answers a verdict per message. On
    /// `Err` the transport must not acknowledge any of the batch.
    async fn process(&self, batch: &[Incoming]) -> Result<Vec<Verdict>, Error>;

    /// Keeps `letter` durably; a letter kept before (same origin) is kept
    /// once.
    async fn keep_dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), Error>;
}

#[async_trait::async_trait]
impl<C: Consumer + ?Sized> Consumer for std::sync::Arc<C> {
    fn consumer(&self) -> &str {
        (**self).consumer()
    }

    fn metrics(&self) -> &ConsumerMetrics {
        (**self).metrics()
    }

    async fn process(&self, batch: &[Incoming]) -> Result<Vec<Verdict>, Error> {
        (**self).process(batch).await
    }

    async fn keep_dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), Error> {
        (**self).keep_dead_letter(letter).await
    }
}

#[async_trait::async_trait]
impl<H: Handler> Consumer for Inbox<H> {
    fn consumer(&self) -> &str {
        &self.consumer
    }

    fn metrics(&self) -> &ConsumerMetrics {
        &self.metrics
    }

    async fn process(&self, batch: &[Incoming]) -> Result<Vec<Verdict>, Error> {
        Inbox::process(self, batch).await
    }

    async fn keep_dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), Error> {
        keep_dead_letter(&self.pool, &self.consumer, letter).await?;
        self.metrics.kept(&self.consumer);
        Ok(())
    }
}

/// Stores `letter` of `consumer` in `dead_letters`, its key and body cut to
/// [`DEAD_LETTER_HEAD`] bytes, with the body's size and SHA-256.
pub async fn keep_dead_letter(
    pool: &PgPool,
    consumer: &str,
    letter: &DeadLetter<'_>,
) -> sqlx::Result<()> {
    use sha2::Digest;
    let head = |b: &'_ [u8]| b[..b.len().min(DEAD_LETTER_HEAD)].to_vec();
    tracing::error!(
        consumer,
        origin = letter.origin,
        poison = %letter.poison,
        refused = letter.refused,
        "the dead-letter destination refused a message; kept in the dead_letters table"
    );
    sqlx::query(
        "INSERT INTO dead_letters (consumer, origin, message_id, class, reason, refused,
                                   key_head, payload_head, payload_size, payload_sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (consumer, origin) DO NOTHING",
    )
    .bind(consumer)
    .bind(letter.origin)
    .bind(letter.message_id)
    .bind(letter.poison.class)
    .bind(&letter.poison.reason)
    .bind(letter.refused)
    .bind(letter.key.map(head))
    .bind(head(letter.payload))
    .bind(i64::try_from(letter.payload.len()).unwrap_or(i64::MAX))
    .bind(sha2::Sha256::digest(letter.payload).to_vec())
    .execute(pool)
    .await
    .map(drop)
}

/// One consumer's inbox.
pub struct Inbox<H> {
    pool: PgPool,
    consumer: String,
    handler: H,
    metrics: ConsumerMetrics,
    transactions: usize,
}

impl<H: Handler> Inbox<H> {
    /// The inbox of `consumer`, applying with `handler`.
    pub fn new(pool: PgPool, consumer: &str, handler: H, metrics: ConsumerMetrics) -> Self {
        metrics.start(consumer);
        Self {
            pool,
            consumer: consumer.to_owned(),
            handler,
            metrics,
            transactions: 1,
        }
    }

    /// Splits each batch by [`Handler::ordering_key`] over up to `n`
    /// transactions that run at once, so the database works on one while
    /// this process prepares another. A key's messages stay in one of them,
    /// in order. The transport still acknowledges the batch only after all
    /// have committed; if one fails, the batch comes again and the
    /// committed part is found in the inbox.
    pub fn with_transactions(mut self, n: usize) -> Self {
        self.transactions = n.max(1);
        self
    }

    /// The consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Its metrics.
    pub fn metrics(&self) -> &ConsumerMetrics {
        &self.metrics
    }

    /// Applies a batch in one transaction, in order, and answers a verdict
    /// per message. On `Err` nothing committed and the transport must not
    /// acknowledge any of the batch.
    pub async fn process(&self, batch: &[Incoming]) -> Result<Vec<Verdict>, Error> {
        let started = Instant::now();
        let mut verdicts = vec![Verdict::Duplicate; batch.len()];
        let mut decoded = Vec::with_capacity(batch.len());
        for (i, incoming) in batch.iter().enumerate() {
            let message = match &incoming.id {
                None if !self.handler.ids_from_body() => {
                    Err(Poison::new("no_id", "the message carries no id"))
                }
                _ => self.handler.decode(incoming).and_then(|m| {
                    let id = self
                        .handler
                        .message_id(incoming, &m)
                        .ok_or_else(|| Poison::new("no_id", "the message carries no id"))?;
                    Ok((i, id, m))
                }),
            };
            match message {
                Ok(m) => decoded.push(m),
                Err(poison) => verdicts[i] = Verdict::Dead(poison),
            }
        }
        let outcomes =
            futures::future::join_all(self.split(decoded).iter().map(|part| self.settle(part)))
                .await;
        for outcome in outcomes {
            for (i, verdict) in outcome? {
                verdicts[i] = verdict;
            }
        }
        self.metrics
            .observe(&self.consumer, &verdicts, started.elapsed());
        fault::after_commit(&verdicts).await;
        Ok(verdicts)
    }

    /// The batch's decoded messages in parts that may apply at once: one
    /// part unless the handler keys its messages.
    fn split(&self, decoded: Decoded<H::Message>) -> Vec<Decoded<H::Message>> {
        let n = self.transactions;
        let part_of = |m: &H::Message| {
            self.handler.ordering_key(m).map(|key| {
                let mut hash = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(key, &mut hash);
                std::hash::Hasher::finish(&hash) as usize % n
            })
        };
        let Some(places) = (n > 1)
            .then(|| {
                decoded
                    .iter()
                    .map(|(_, _, m)| part_of(m))
                    .collect::<Option<Vec<_>>>()
            })
            .flatten()
        else {
            return vec![decoded];
        };
        let mut parts: Vec<Decoded<H::Message>> = (0..n).map(|_| Vec::new()).collect();
        for (message, place) in decoded.into_iter().zip(places) {
            parts[place].push(message);
        }
        parts.retain(|p| !p.is_empty());
        parts
    }

    /// Applies one part in a transaction and answers a verdict per message.
    /// A message the database refuses must not block the ones behind it:
    /// then the part is applied one by one, and only the refused one is
    /// buried.
    async fn settle(&self, part: &Decoded<H::Message>) -> Result<Vec<(usize, Verdict)>, Error> {
        let applied = |ids: Vec<usize>| ids.into_iter().map(|i| (i, Verdict::Applied));
        match self.apply(part).await {
            Ok(ids) => Ok(applied(ids).collect()),
            Err(e) if part.len() > 1 && !is_outage(&e) => {
                let mut verdicts = Vec::with_capacity(part.len());
                for one in part.chunks(1) {
                    match self.apply(one).await {
                        Ok(ids) => verdicts.extend(applied(ids)),
                        Err(e) if !is_outage(&e) => verdicts.push((
                            one[0].0,
                            Verdict::Dead(Poison::new("apply_failed", e.to_string())),
                        )),
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(verdicts)
            }
            Err(e) if !is_outage(&e) => Ok(part
                .first()
                .map(|&(i, _, _)| (i, Verdict::Dead(Poison::new("apply_failed", e.to_string()))))
                .into_iter()
                .collect()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records and applies `messages` in one transaction; returns the batch
    /// positions applied (the rest were in the inbox already).
    async fn apply(&self, messages: &[(usize, String, H::Message)]) -> sqlx::Result<Vec<usize>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = messages.iter().map(|(_, id, _)| id.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        // A batch may carry one id twice; only its first copy is new.
        let mut fresh: HashSet<String> = sqlx::query_scalar(
            "INSERT INTO inbox (consumer, message_id)
             SELECT $1, unnest($2::text[])
             ON CONFLICT DO NOTHING
             RETURNING message_id",
        )
        .bind(&self.consumer)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut applied = Vec::with_capacity(fresh.len());
        let mut new = Vec::with_capacity(fresh.len());
        for (i, id, message) in messages {
            if fresh.remove(id.as_str()) {
                new.push(message);
                applied.push(*i);
            }
        }
        // Keyed messages apply in key order (stable, so one key's keep
        // theirs): two transactions of this consumer at once (two queues,
        // two parts of a batch) then lock their keys' rows in one order and
        // wait for each other instead of deadlocking. The orchestrator met
        // that once StockReserved and PaymentSucceeded of one order came in
        // together on two queues.
        if new.iter().all(|m| self.handler.ordering_key(m).is_some()) {
            new.sort_by(|a, b| {
                self.handler
                    .ordering_key(a)
                    .cmp(&self.handler.ordering_key(b))
            });
        }
        self.handler.apply_batch(&mut tx, &new).await?;
        tx.commit().await?;
        Ok(applied)
    }
}

/// Decoded messages of a batch: position, inbox id, message.
type Decoded<M> = Vec<(usize, String, M)>;

/// Whether `e` says the database is away rather than that it refused this
/// message.
fn is_outage(e: &sqlx::Error) -> bool {
    match e {
        // What a handler answers for input it refuses (store's refusals).
        sqlx::Error::InvalidArgument(_) => false,
        sqlx::Error::Database(db) => {
            // Class 08 (connection), 53 (resources), 57 (operator
            // intervention, e.g. a shutdown), 40 (serialization, deadlock).
            let code = db.code().unwrap_or_default();
            ["08", "53", "57", "40"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        _ => true,
    }
}

/// The fault suite's hook between an inbox commit and the transport's
/// acknowledgement.
mod fault {
    use super::Verdict;

    /// With `ORDERS_CENTER_HOLD_AFTER_COMMIT=<file>`, the first commit that
    /// applied something writes `<file>` and never returns, so a test can
    /// SIGKILL the consumer exactly between its commit and its ack.
    pub(crate) async fn after_commit(verdicts: &[Verdict]) {
        let Some(marker) = std::env::var_os("ORDERS_CENTER_HOLD_AFTER_COMMIT") else {
            return;
        };
        if !verdicts.contains(&Verdict::Applied) {
            return;
        }
        if let Err(e) = std::fs::write(&marker, b"committed, not acknowledged\n") {
            tracing::error!(error = %e, "cannot write the hold marker");
        }
        tracing::warn!("holding after an inbox commit, as the fault hook asks");
        std::future::pending::<()>().await;
    }
}

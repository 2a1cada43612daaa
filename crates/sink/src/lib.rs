//! The seam in front of every outbox destination. The delivery engine hands
//! a [`Sink`] one [`Message`], or a batch of them, and acts on each answer:
//! done, retry later, dead, or hold the key while an attempt may still land. How a
//! destination's own failures map onto those classes is the sink's business
//! (1C's HTTP statuses are classified in the `onec` crate, not here).

pub mod signing;

use std::fmt;
use std::time::Duration;

use uuid::Uuid;

/// One outbox message, as a sink receives it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The event's id, the same on every destination's copy; a consumer
    /// deduplicates on it.
    pub event_id: Uuid,
    /// Debezium's `aggregatetype`, e.g. `order`: the topic or exchange.
    pub aggregate_type: String,
    /// Debezium's `aggregateid`, e.g. the order id: the ordering key.
    pub aggregate_id: String,
    /// The event, e.g. `order.updated`.
    pub kind: String,
    /// The aggregate's version the event belongs to.
    pub version: i64,
    /// The payload as committed, as JSON text: a sink passes it on without
    /// parsing it.
    pub payload: Box<serde_json::value::RawValue>,
    /// W3C trace context of the delivery span, to pass on.
    pub traceparent: Option<String>,
    /// The [`signing`] signature of the message, when its stream has a key.
    pub signature: Option<String>,
}

impl Message {
    /// The payload parsed, for a sink that needs to look inside.
    pub fn payload_json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_str(self.payload.get())
    }
}

/// How a failed delivery is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The destination or the path to it may be fine later: retry with
    /// backoff until the attempts run out.
    Transient,
    /// This message will never be accepted: dead at once.
    Permanent,
    /// Sent, but no answer came back: the destination may still apply it.
    /// Retried like a transient failure, and the key's newer messages wait
    /// until the attempt can no longer land.
    InDoubt,
}

/// A failed delivery, classified.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// How to handle it.
    pub kind: FailureKind,
    /// A stable label for metrics, e.g. `timeout`, `throttled`, `rejected`.
    pub class: &'static str,
    /// Whether it says the destination is unwell, so the circuit breaker
    /// counts it. A rejected message says nothing about the destination.
    pub counts_against_destination: bool,
    /// How long the destination asked us to wait, if it did.
    pub retry_after: Option<Duration>,
    /// A human-readable reason, kept as the task's `last_error`.
    pub detail: String,
}

impl Failure {
    /// What a message of a batch comes to when it was not sent because an
    /// earlier one failed: sending it could let it overtake that one.
    pub fn not_sent() -> Self {
        Self {
            kind: FailureKind::Transient,
            class: "not_sent",
            counts_against_destination: false,
            retry_after: None,
            detail: "not sent: an earlier message of its batch failed".into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// What one delivery came to.
pub type Outcome = Result<(), Failure>;

/// A destination of the outbox. Implementations must be safe to call
/// concurrently; the engine bounds how many calls run at once.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Delivers one message. Success means the destination has it for good
    /// (an HTTP 200, a broker's acknowledgement).
    async fn deliver(&self, message: &Message) -> Outcome;

    /// Delivers `messages` as one batch, in order: one outcome per message,
    /// in the same order. A destination that pipelines (Kafka, RabbitMQ)
    /// overrides it. This form sends one at a time and, after a failure
    /// that may pass, sends none of the rest ([`Failure::not_sent`]), so no
    /// message overtakes one that failed; a message refused for good does
    /// not stop the rest.
    async fn deliver_batch(&self, messages: &[Message]) -> Vec<Outcome> {
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(messages.len());
        for message in messages {
            let stopped = outcomes
                .iter()
                .any(|o| o.as_ref().is_err_and(|f| f.kind != FailureKind::Permanent));
            outcomes.push(if stopped {
                Err(Failure::not_sent())
            } else {
                self.deliver(message).await
            });
        }
        outcomes
    }

    /// Delivers the run of log partition `partition`: as
    /// [`deliver_batch`](Self::deliver_batch), unless the destination ties
    /// a run to its partition (Kafka's transactional producer, one
    /// `transactional.id` per partition).
    async fn deliver_run(&self, partition: i16, messages: &[Message]) -> Vec<Outcome> {
        let _ = partition;
        self.deliver_batch(messages).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Fails the messages whose version is in `fail`, with `kind`, and
    /// remembers what it was sent.
    struct Scripted {
        fail: Vec<i64>,
        kind: FailureKind,
        sent: Mutex<Vec<i64>>,
    }

    #[async_trait::async_trait]
    impl Sink for Scripted {
        async fn deliver(&self, m: &Message) -> Outcome {
            self.sent.lock().unwrap().push(m.version);
            if self.fail.contains(&m.version) {
                return Err(Failure {
                    kind: self.kind,
                    class: "scripted",
                    counts_against_destination: false,
                    retry_after: None,
                    detail: "scripted".into(),
                });
            }
            Ok(())
        }
    }

    fn batch() -> Vec<Message> {
        (1..=4)
            .map(|version| Message {
                event_id: Uuid::now_v7(),
                aggregate_type: "order".into(),
                aggregate_id: "K-1".into(),
                kind: "order.updated".into(),
                version,
                payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                traceparent: None,
                signature: None,
            })
            .collect()
    }

    fn classes(outcomes: &[Outcome]) -> Vec<&'static str> {
        outcomes
            .iter()
            .map(|o| o.as_ref().map_or_else(|f| f.class, |()| "ok"))
            .collect()
    }

    #[tokio::test]
    async fn a_batch_stops_at_a_failure_that_may_pass_and_goes_on_past_a_refusal() {
        let transient = Scripted {
            fail: vec![2],
            kind: FailureKind::Transient,
            sent: Mutex::default(),
        };
        let outcomes = transient.deliver_batch(&batch()).await;
        assert_eq!(
            classes(&outcomes),
            ["ok", "scripted", "not_sent", "not_sent"]
        );
        assert_eq!(
            *transient.sent.lock().unwrap(),
            [1, 2],
            "nothing overtakes 2"
        );

        let refused = Scripted {
            fail: vec![2],
            kind: FailureKind::Permanent,
            sent: Mutex::default(),
        };
        let outcomes = refused.deliver_batch(&batch()).await;
        assert_eq!(classes(&outcomes), ["ok", "scripted", "ok", "ok"]);
        assert_eq!(*refused.sent.lock().unwrap(), [1, 2, 3, 4]);
    }
}

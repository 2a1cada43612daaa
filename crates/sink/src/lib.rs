//! The seam in front of every outbox destination. The delivery engine hands
//! a [`Sink`] one [`Message`] at a time and acts on the answer: done, retry
//! later, dead, or hold the key while an attempt may still land. How a
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
}

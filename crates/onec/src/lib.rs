//! The 1C contract as DESIGN.md fixes it: `PUT /hs/orders/v1/orders/{id}` with
//! Basic auth, the OrderFull snapshot plus `version` as the body, and the
//! `Idempotency-Key: {id}:{version}` and `traceparent` headers.

mod client;
mod outcome;

#[cfg(any(test, feature = "mock"))]
pub use client::MockOnecClient;
pub use client::{Credentials, HttpOnecClient, OnecClient, OnecConfig};
pub use outcome::{classify_response, parse_retry_after, Applied, ErrorClass, Failure, Outcome};

use serde::{Deserialize, Serialize};

/// One delivery: an order version and the snapshot committed with it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The order id, URL-safe by the domain's id rules.
    pub order_id: String,
    /// The order version.
    pub version: i64,
    /// The OrderFull as committed, as JSON text.
    pub snapshot: Box<serde_json::value::RawValue>,
    /// W3C trace context of the save, passed on to 1C.
    pub traceparent: Option<String>,
}

impl Delivery {
    /// The `Idempotency-Key` 1C deduplicates on.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.order_id, self.version)
    }

    /// The request body, a [`WireOrder`]: `version` spliced into the
    /// snapshot's text, which is never parsed on the way (nor its money
    /// rounded). `None` when the snapshot is not a JSON object.
    pub fn body(&self) -> Option<String> {
        let fields = self
            .snapshot
            .get()
            .trim()
            .strip_prefix('{')?
            .strip_suffix('}')?
            .trim();
        let version = self.version;
        Some(if fields.is_empty() {
            format!("{{\"version\":{version}}}")
        } else {
            format!("{{\"version\":{version},{fields}}}")
        })
    }
}

/// The request body: the snapshot's fields plus `version`. The relay sends
/// it over a borrowed snapshot; 1C (and the mock) read it into an owned one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireOrder<S> {
    /// The order version.
    pub version: i64,
    /// `order`, `items`, `payments` and `history`: an OrderFull, money
    /// as exact JSON numbers.
    #[serde(flatten)]
    pub snapshot: S,
}

/// What 1C answers on 200: what it did with the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// What happened.
    pub result: Applied,
    /// The version 1C holds now.
    pub version: i64,
}

/// 1C as an outbox destination: each message is an order snapshot, sent as
/// [`Delivery`] through an [`OnecClient`], and each [`Outcome`] classified
/// for the delivery engine.
pub struct OnecSink {
    client: std::sync::Arc<dyn OnecClient>,
}

impl OnecSink {
    /// Delivers through `client`.
    pub fn new(client: std::sync::Arc<dyn OnecClient>) -> Self {
        Self { client }
    }
}

#[async_trait::async_trait]
impl sink::Sink for OnecSink {
    async fn deliver(&self, message: &sink::Message) -> sink::Outcome {
        let delivery = Delivery {
            order_id: message.aggregate_id.clone(),
            version: message.version,
            snapshot: message.payload.clone(),
            traceparent: message.traceparent.clone(),
        };
        match self.client.put_order(&delivery).await {
            Outcome::Delivered(_) => Ok(()),
            Outcome::Failed(f) => Err(f.into()),
        }
    }
}

impl From<Failure> for sink::Failure {
    fn from(f: Failure) -> Self {
        let kind = if !f.class.is_transient() {
            sink::FailureKind::Permanent
        } else if f.class.outcome_unknown() {
            sink::FailureKind::InDoubt
        } else {
            sink::FailureKind::Transient
        };
        Self {
            kind,
            class: f.class.as_str(),
            counts_against_destination: f.class.counts_against_1c(),
            retry_after: f.retry_after,
            detail: f.detail,
        }
    }
}

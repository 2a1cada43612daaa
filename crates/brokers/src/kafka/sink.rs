//! The outbox sink to Kafka.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sink::{Failure, FailureKind, Message, Outcome, Sink};

use super::KafkaConfig;
use crate::{headers, Error};

/// Publishes outbox messages to `<prefix><aggregate type>`, keyed by the
/// aggregate id. A message counts as delivered when every in-sync replica
/// has it (`acks=all`).
pub struct KafkaSink {
    config: KafkaConfig,
    producer: Mutex<Producer>,
}

/// The producer in use, and since when nothing has gone out: its last
/// delivery, or its creation if none came since.
struct Producer {
    current: Arc<FutureProducer>,
    quiet_since: Instant,
}

impl KafkaSink {
    /// A sink with its own producer; connects lazily.
    pub fn new(config: KafkaConfig) -> Result<Self, Error> {
        let producer = Mutex::new(Producer {
            current: Arc::new(config.producer()?),
            quiet_since: Instant::now(),
        });
        Ok(Self { config, producer })
    }

    /// How long every delivery may time out before the producer is
    /// replaced. After a broker froze for 20 s, one idempotent producer
    /// of the fault suite never produced again (every probe timed out for
    /// 4 minutes) while the other roles' producers recovered; a new one
    /// starts from a fresh connection and producer id.
    fn renew_after(&self) -> Duration {
        (self.config.delivery_timeout * 4).max(Duration::from_secs(10))
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.lock().expect("not poisoned").current.clone()
    }

    fn delivered(&self) {
        self.producer.lock().expect("not poisoned").quiet_since = Instant::now();
    }

    /// After a timeout: replaces the producer when nothing has gone out
    /// through it for [`Self::renew_after`]; a new one starts quiet, so
    /// this happens at most once per that period.
    fn timed_out(&self) {
        let renew_after = self.renew_after();
        let mut p = self.producer.lock().expect("not poisoned");
        let now = Instant::now();
        if now - p.quiet_since < renew_after {
            return;
        }
        match self.config.producer() {
            Ok(fresh) => {
                let old = std::mem::replace(&mut p.current, Arc::new(fresh));
                tracing::warn!(silent = ?now - p.quiet_since, "no delivery to Kafka went out for a while; the producer is replaced");
                p.quiet_since = now;
                // Destroying a client waits for its threads: not on a
                // runtime worker.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::warn!(error = %e, "could not create a new Kafka producer"),
        }
    }
}

/// The headers of `m`'s record.
pub(super) fn record_headers(m: &Message) -> OwnedHeaders {
    let (event_id, version) = (m.event_id.to_string(), m.version.to_string());
    let mut h = OwnedHeaders::new_with_capacity(5)
        .insert(header(headers::EVENT_ID, &event_id))
        .insert(header(headers::TYPE, &m.kind))
        .insert(header(headers::VERSION, &version));
    if let Some(tp) = &m.traceparent {
        h = h.insert(header(headers::TRACEPARENT, tp));
    }
    if let Some(signature) = &m.signature {
        h = h.insert(header(headers::SIGNATURE, signature));
    }
    h
}

type Sent = Result<Result<Delivery, KafkaError>, tokio::time::error::Elapsed>;

impl KafkaSink {
    /// How long a delivery may take. librdkafka times a message out itself,
    /// but not one inside a request to a frozen broker until that request
    /// times out; this bound keeps a delivery from outliving the claim.
    fn bound(&self) -> Duration {
        self.config.delivery_timeout + Duration::from_secs(1)
    }

    /// What a produce came to.
    fn settle(&self, m: &Message, topic: &str, sent: Sent) -> Outcome {
        let event_id = m.event_id.to_string();
        let e = match sent {
            Ok(Ok(d)) if d.offset < 0 => {
                // librdkafka acknowledges a retry the broker calls a
                // duplicate sequence without an offset, and such
                // acknowledgements after a broker freeze have covered
                // messages that never reached the log (librdkafka #4134).
                // Sent again, it is either there once more, which the
                // consumers' inbox skips, or there at last.
                tracing::warn!(
                    event_id,
                    topic,
                    partition = d.partition,
                    "acknowledged without an offset; sending again"
                );
                self.delivered();
                return Err(Failure {
                    kind: FailureKind::Transient,
                    class: "unconfirmed",
                    counts_against_destination: false,
                    retry_after: None,
                    detail: "kafka: acknowledged without an offset".into(),
                });
            }
            Ok(Ok(d)) => {
                tracing::debug!(
                    event_id,
                    topic,
                    partition = d.partition,
                    offset = d.offset,
                    "produced"
                );
                self.delivered();
                return Ok(());
            }
            Ok(Err(e)) => e,
            Err(_) => KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
            self.timed_out();
        }
        Err(classify(&e))
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn deliver(&self, m: &Message) -> Outcome {
        let topic = self.config.topic(&m.aggregate_type);
        let record = FutureRecord::to(&topic)
            .key(&m.aggregate_id)
            .payload(m.payload.get())
            .headers(record_headers(m));
        let producer = self.producer();
        // A full local queue waits a second before it counts as a failure.
        let sent =
            tokio::time::timeout(self.bound(), producer.send(record, Duration::from_secs(1)))
                .await
                .map(|sent| sent.map_err(|(e, _)| e));
        drop(producer);
        self.settle(m, &topic, sent)
    }

    /// Pipelines the batch: every record is queued before any
    /// acknowledgement is awaited, and the idempotent producer keeps one
    /// partition's records in the order queued. A record the local queue
    /// refuses, and every one after it, is not sent.
    async fn deliver_batch(&self, messages: &[Message]) -> Vec<Outcome> {
        let producer = self.producer();
        let topics: Vec<String> = messages
            .iter()
            .map(|m| self.config.topic(&m.aggregate_type))
            .collect();
        let mut queued = Vec::with_capacity(messages.len());
        let mut refused = None;
        for (m, topic) in messages.iter().zip(&topics) {
            let record = FutureRecord::to(topic)
                .key(&m.aggregate_id)
                .payload(m.payload.get())
                .headers(record_headers(m));
            match producer.send_result(record) {
                Ok(delivery) => queued.push(delivery),
                Err((e, _)) => {
                    refused = Some(classify(&e));
                    break;
                }
            }
        }
        drop(producer);
        // One deadline for the whole batch: a frozen broker costs one bound, not one per record.
        let deadline = tokio::time::Instant::now() + self.bound();
        let mut outcomes = Vec::with_capacity(messages.len());
        for ((m, topic), delivery) in messages.iter().zip(&topics).zip(queued) {
            let sent = tokio::time::timeout_at(deadline, delivery)
                .await
                // Canceled: the producer went away before it answered.
                .map(|r| r.map_or(Err(KafkaError::Canceled), |d| d.map_err(|(e, _)| e)));
            outcomes.push(self.settle(m, topic, sent));
        }
        if let Some(failure) = refused {
            outcomes.push(Err(failure));
        }
        outcomes.resize_with(messages.len(), || Err(Failure::not_sent()));
        outcomes
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// What a failed produce means for the outbox row.
pub(super) fn classify(e: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let code = e.rdkafka_error_code();
    let (kind, class, counts) = match code {
        // The message itself is unacceptable: retrying cannot help.
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed,
        ) => (FailureKind::Permanent, "rejected", false),
        // Our own queue is full: we are too fast, not the broker unwell.
        Some(C::QueueFull) => (FailureKind::Transient, "queue_full", false),
        Some(C::MessageTimedOut) => (FailureKind::Transient, "timeout", true),
        _ => (FailureKind::Transient, "broker", true),
    };
    Failure {
        kind,
        class,
        counts_against_destination: counts,
        retry_after: None,
        detail: format!("kafka: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_message_is_permanent_and_an_unreachable_broker_transient() {
        let too_big = classify(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert_eq!(too_big.kind, FailureKind::Permanent);
        assert!(!too_big.counts_against_destination);
        let timeout = classify(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ));
        assert_eq!(
            (
                timeout.kind,
                timeout.class,
                timeout.counts_against_destination
            ),
            (FailureKind::Transient, "timeout", true)
        );
        let full = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
        assert!(!full.counts_against_destination);
    }
}

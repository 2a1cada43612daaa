//! Kafka: the outbox sink ([`KafkaSink`]) and the inbox consumer
//! ([`consume`]). Topics are named `<prefix><aggregate type>`, e.g. `order`;
//! a consumer's poison goes to `<topic>.dead`.

mod consumer;
mod sink;
mod transactional;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

pub use consumer::{consume, KafkaSubscription};
pub use sink::KafkaSink;
pub use transactional::TransactionalSink;

use crate::{headers, Error};

/// The outbox event id a message carries in its header, if any.
pub fn event_id(m: &impl Message) -> Option<String> {
    header(m, headers::EVENT_ID)
}

/// The text of header `key`, if the message has it as UTF-8.
pub(crate) fn header(m: &impl Message, key: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)?
        .value
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

/// How to reach Kafka and name topics.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// Put before every topic name, e.g. for one environment per cluster.
    pub topic_prefix: String,
    /// How long a produce may wait for the broker's acknowledgement before
    /// it counts as failed (librdkafka's `message.timeout.ms`). Short enough
    /// that an outage opens the breaker instead of piling up sends.
    pub delivery_timeout: Duration,
    /// Partitions of topics this process creates.
    pub partitions: i32,
}

impl KafkaConfig {
    /// Defaults for `bootstrap`.
    pub fn new(bootstrap: &str) -> Self {
        Self {
            bootstrap: bootstrap.to_owned(),
            topic_prefix: String::new(),
            delivery_timeout: Duration::from_secs(10),
            partitions: 6,
        }
    }

    /// The topic of `aggregate_type`'s events.
    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}{aggregate_type}", self.topic_prefix)
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// An idempotent producer with `acks=all`: a retried send never
    /// duplicates or reorders within a partition.
    pub fn producer(&self) -> Result<FutureProducer, Error> {
        Ok(self.producer_config().create()?)
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            // Fewer, fuller requests. 2 ms (with lz4) put the commit-to-
            // consumer p99 at 500 saves/s at 160-175 ms: small requests queued
            // behind the idempotent producer's five in flight. 5 ms keeps
            // the drain of 10 ms (22,800-24,200 events/s against 22,100-
            // 23,200 in alternated runs) and takes 4-5 ms off the median.
            // Notices are small; compression bought nothing (BENCHMARKS.md).
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            );
        c
    }

    /// A transactional producer with `transactional.id` `id` (not yet
    /// initialised).
    pub fn transactional_producer(&self, id: &str) -> Result<FutureProducer, Error> {
        Ok(self
            .producer_config()
            .set("transactional.id", id)
            .set(
                "transaction.timeout.ms",
                (self.delivery_timeout * 6).as_millis().to_string(),
            )
            .create()?)
    }

    /// The producer of a consumer's dead letters: as [`Self::producer`],
    /// but its own size limit is far above any broker's. A consumer can
    /// read a record up to the topic's limit (about 1 MiB by default),
    /// above librdkafka's default of 1,000,000 bytes, and a dead letter
    /// adds headers to it; the broker is left to say what it takes.
    pub fn dead_letter_producer(&self) -> Result<FutureProducer, Error> {
        Ok(self
            .producer_config()
            .set("message.max.bytes", DEAD_LETTER_MAX_BYTES.to_string())
            .create()?)
    }

    /// Creates the topics of `aggregate_types` and their dead-letter topics
    /// if they are missing.
    pub async fn ensure_topics(&self, aggregate_types: &[&str]) -> Result<(), Error> {
        let admin: AdminClient<DefaultClientContext> = self.client().create()?;
        let names: Vec<String> = aggregate_types
            .iter()
            .flat_map(|t| [self.topic(t), dead_topic(&self.topic(t))])
            .collect();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, self.partitions, TopicReplication::Fixed(-1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                // A least-privilege user may not create topics: then an
                // administrator has, or the consumer will say what is missing.
                Err((
                    topic,
                    RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed,
                )) => {
                    tracing::warn!(
                        topic,
                        "not allowed to create this topic; it must exist already"
                    );
                }
                Err((topic, code)) => {
                    return Err(Error::Topic {
                        topic,
                        detail: code.to_string(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// The dead-letter producer's own limit on one request.
const DEAD_LETTER_MAX_BYTES: u32 = 100_000_000;

/// Where a consumer of `topic` puts the messages it can never apply.
pub fn dead_topic(topic: &str) -> String {
    format!("{topic}.dead")
}

//! Kafka transactions for the log's runs: the run of log partition `p` goes
//! out as one transaction of a producer whose `transactional.id` is
//! `<prefix>orders-center.<log>.<destination>.<p>`, where `<log>` is the
//! identity of the database's log: the relays of one log share a
//! partition's id, the logs of other databases (the saga's services) never
//! fence each other. Every record is produced,
//! then the transaction commits; only then does the cursor move. On any
//! failure the transaction aborts and nothing of it is visible to a
//! `read_committed` consumer (librdkafka's default), so a run is in the
//! log whole or not at all: the gap a lost acknowledgement left
//! (librdkafka #4134) cannot open. A relay that takes a partition over
//! initialises the same id, which fences the previous holder's producer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sink::{Failure, FailureKind, Message, Outcome, Sink};

use super::sink::{classify, record_headers};
use super::{KafkaConfig, KafkaSink};
use crate::Error;

/// Delivers log runs in Kafka transactions, and single messages (outside
/// the log) through a plain idempotent producer.
pub struct TransactionalSink {
    config: KafkaConfig,
    id_prefix: String,
    plain: KafkaSink,
    producers: Mutex<HashMap<i16, Arc<FutureProducer>>>,
}

impl TransactionalSink {
    /// A sink for `destination`'s runs of the log identified by `log`.
    pub fn new(config: KafkaConfig, log: &str, destination: &str) -> Result<Self, Error> {
        Ok(Self {
            id_prefix: format!("{}orders-center.{log}.{destination}.", config.topic_prefix),
            plain: KafkaSink::new(config.clone())?,
            config,
            producers: Mutex::default(),
        })
    }

    /// The transactional producer of `partition`, initialised (which fences
    /// any earlier producer of the same id).
    async fn producer(&self, partition: i16) -> Result<Arc<FutureProducer>, Failure> {
        if let Some(p) = self.producers.lock().expect("not poisoned").get(&partition) {
            return Ok(p.clone());
        }
        let id = format!("{}{partition}", self.id_prefix);
        let producer: FutureProducer = self
            .config
            .transactional_producer(&id)
            .map_err(|e| failure("connection", &e.to_string()))?;
        let timeout = self.config.delivery_timeout;
        let producer = tokio::task::spawn_blocking(move || {
            producer.init_transactions(timeout).map(|()| producer)
        })
        .await
        .map_err(|e| failure("connection", &e.to_string()))?
        .map_err(|e| kafka_failure(&e))?;
        let producer = Arc::new(producer);
        self.producers
            .lock()
            .expect("not poisoned")
            .insert(partition, producer.clone());
        Ok(producer)
    }

    /// Drops `partition`'s producer after an error it cannot go on from:
    /// the next run starts with a fresh one.
    fn forget(&self, partition: i16) {
        if let Some(old) = self
            .producers
            .lock()
            .expect("not poisoned")
            .remove(&partition)
        {
            tokio::task::spawn_blocking(move || drop(old));
        }
    }

    /// One transaction: every record in `sending`, then commit. The
    /// indexes of records the broker or the client refused for good come
    /// back in the error, so the caller can send the rest without them.
    async fn transaction(
        &self,
        partition: i16,
        messages: &[&Message],
    ) -> Result<(), (Failure, Vec<usize>)> {
        let producer = self.producer(partition).await.map_err(|f| (f, vec![]))?;
        if let Err(e) = producer.begin_transaction() {
            self.forget(partition);
            return Err((kafka_failure(&e), vec![]));
        }
        let topics: Vec<String> = messages
            .iter()
            .map(|m| self.config.topic(&m.aggregate_type))
            .collect();
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut refused = Vec::new();
        let mut failed = None;
        for (i, (m, topic)) in messages.iter().zip(&topics).enumerate() {
            let record = FutureRecord::to(topic)
                .key(&m.aggregate_id)
                .payload(m.payload.get())
                .headers(record_headers(m));
            match producer.send_result(record) {
                Ok(d) => deliveries.push((i, d)),
                Err((e, _)) => {
                    let f = classify(&e);
                    if f.kind == FailureKind::Permanent {
                        refused.push(i);
                    }
                    failed = Some(f);
                    break;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.delivery_timeout;
        for (i, delivery) in deliveries {
            match tokio::time::timeout_at(deadline, delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => {
                    let f = classify(&e);
                    if f.kind == FailureKind::Permanent {
                        refused.push(i);
                    }
                    failed.get_or_insert(f);
                }
                Ok(Err(_canceled)) => {
                    failed.get_or_insert(failure("broker", "the producer went away"));
                }
                Err(_) => {
                    failed.get_or_insert(failure("timeout", "no acknowledgement in time"));
                }
            }
        }
        // A producer another holder of the id fenced purges its queue: the
        // records fail as purged, and the cause is the fatal error.
        if let Some((code, reason)) = producer.client().fatal_error() {
            self.forget(partition);
            let class = match code {
                RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced => "fenced",
                _ => "broker",
            };
            return Err((failure(class, &reason), vec![]));
        }
        let timeout = self.config.delivery_timeout;
        let ending = producer.clone();
        let ended = match failed {
            None => tokio::task::spawn_blocking(move || ending.commit_transaction(timeout)).await,
            Some(_) => tokio::task::spawn_blocking(move || ending.abort_transaction(timeout)).await,
        };
        let ended = ended.map_err(|e| (failure("broker", &e.to_string()), vec![]))?;
        if let Err(e) = &ended {
            // Fenced, or the transaction state is unknown: start over.
            self.forget(partition);
            if failed.is_none() {
                return Err((kafka_failure(e), vec![]));
            }
        }
        match failed {
            None => Ok(()),
            Some(f) => Err((f, refused)),
        }
    }
}

#[async_trait::async_trait]
impl Sink for TransactionalSink {
    async fn deliver(&self, message: &Message) -> Outcome {
        self.plain.deliver(message).await
    }

    async fn deliver_batch(&self, messages: &[Message]) -> Vec<Outcome> {
        self.plain.deliver_batch(messages).await
    }

    /// The run as one transaction. Records refused for good are left out
    /// of a second transaction with the rest, and answered as refused;
    /// any other failure aborts the run, and every record of it is to be
    /// sent again.
    async fn deliver_run(&self, partition: i16, messages: &[Message]) -> Vec<Outcome> {
        let all: Vec<&Message> = messages.iter().collect();
        let (failure, refused) = match self.transaction(partition, &all).await {
            Ok(()) => return vec![Ok(()); messages.len()],
            Err(e) => e,
        };
        if refused.is_empty() {
            return vec![Err(aborted(&failure)); messages.len()];
        }
        let rest: Vec<&Message> = (0..messages.len())
            .filter(|i| !refused.contains(i))
            .map(|i| &messages[i])
            .collect();
        let second = self.transaction(partition, &rest).await;
        (0..messages.len())
            .map(|i| {
                if refused.contains(&i) {
                    Err(failure.clone())
                } else {
                    match &second {
                        Ok(()) => Ok(()),
                        Err((f, _)) => Err(aborted(f)),
                    }
                }
            })
            .collect()
    }
}

/// What a record of an aborted transaction comes to: sent again later.
/// A fenced producer says so: another relay holds the partition now.
fn aborted(cause: &Failure) -> Failure {
    if cause.class == "fenced" {
        return cause.clone();
    }
    Failure {
        kind: FailureKind::Transient,
        class: "aborted",
        counts_against_destination: cause.counts_against_destination,
        retry_after: None,
        detail: format!("kafka: the run's transaction was aborted: {}", cause.detail),
    }
}

fn kafka_failure(e: &KafkaError) -> Failure {
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fenced)
        || e.rdkafka_error_code() == Some(RDKafkaErrorCode::ProducerFenced)
    {
        return failure("fenced", &e.to_string());
    }
    let mut f = classify(e);
    // A transaction call that fails says nothing of one message.
    f.kind = FailureKind::Transient;
    f
}

fn failure(class: &'static str, detail: &str) -> Failure {
    Failure {
        kind: FailureKind::Transient,
        class,
        counts_against_destination: class != "fenced",
        retry_after: None,
        detail: format!("kafka: {detail}"),
    }
}

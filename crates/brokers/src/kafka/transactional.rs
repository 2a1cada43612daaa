//! Kafka transactions for the log's batches: each batch a relay lane hands
//! over (the runs of the log partitions it claimed) goes out as one
//! transaction. Every record is produced, then the transaction commits;
//! only then do the cursors move. On any failure the transaction aborts
//! and nothing of it is visible to a `read_committed` consumer, so a batch
//! is in the topic whole or not at all: the gap a lost acknowledgement
//! left (librdkafka #4134) cannot open.
//!
//! A sink keeps one producer per batch in flight, each with a stable
//! `transactional.id`, `<prefix>orders-center.<destination>.<owner>.<n>`
//! (`n` from 0 up to the lanes that ran at once). A producer that failed
//! is replaced by one initialised under the same id, which fences it and
//! aborts its open transaction at once; a relay restarted under the same
//! name fences its previous life the same way. A relay that dies under a
//! new name leaves its open transaction to the broker, which aborts it
//! after `transaction.timeout.ms` (twice `--broker-timeout`, 10 s at
//! least); until then `read_committed` consumers wait at it.

use std::sync::{Arc, Mutex};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sink::{Failure, FailureKind, Message, Outcome, Sink};

use super::record::{classify, record_headers};
use super::KafkaConfig;
use crate::Error;

/// Delivers every batch in a Kafka transaction.
pub struct TransactionalSink {
    config: KafkaConfig,
    id_prefix: String,
    /// Idle slots, each with its producer once initialised.
    idle: Mutex<Vec<Slot>>,
    /// Slots made so far: the next one's number.
    made: Mutex<u32>,
}

/// One `transactional.id` and its producer.
struct Slot {
    n: u32,
    producer: Option<Arc<FutureProducer>>,
}

impl TransactionalSink {
    /// A sink for the log of `destination`, whose transactional ids name
    /// `owner` (the relay).
    pub fn new(config: KafkaConfig, destination: &str, owner: &str) -> Result<Self, Error> {
        Ok(Self {
            id_prefix: format!(
                "{}orders-center.{destination}.{owner}.",
                config.topic_prefix
            ),
            config,
            idle: Mutex::default(),
            made: Mutex::default(),
        })
    }

    /// An idle slot, or a new one.
    fn take(&self) -> Slot {
        if let Some(slot) = self.idle.lock().expect("not poisoned").pop() {
            return slot;
        }
        let mut made = self.made.lock().expect("not poisoned");
        *made += 1;
        Slot {
            n: *made - 1,
            producer: None,
        }
    }

    /// `slot`'s producer, initialised when new (which fences any earlier
    /// producer of the same id and aborts its open transaction).
    async fn producer(&self, slot: &mut Slot) -> Result<Arc<FutureProducer>, Failure> {
        if let Some(p) = &slot.producer {
            return Ok(p.clone());
        }
        let id = format!("{}{}", self.id_prefix, slot.n);
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
        slot.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Drops `slot`'s producer after an error it cannot go on from: the
    /// slot's next batch starts with a fresh one under the same id.
    fn forget(slot: &mut Slot) {
        if let Some(old) = slot.producer.take() {
            tokio::task::spawn_blocking(move || drop(old));
        }
    }

    /// One transaction on `slot`: every record in `messages`, then commit.
    /// The indexes of records the broker or the client refused for good
    /// come back in the error, so the caller can send the rest without
    /// them.
    async fn transaction(
        &self,
        slot: &mut Slot,
        messages: &[&Message],
    ) -> Result<(), (Failure, Vec<usize>)> {
        let producer = self.producer(slot).await.map_err(|f| (f, vec![]))?;
        if let Err(e) = producer.begin_transaction() {
            Self::forget(slot);
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
            Self::forget(slot);
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
            Self::forget(slot);
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
        self.deliver_batch(std::slice::from_ref(message))
            .await
            .pop()
            .expect("one outcome per message")
    }

    /// The batch as one transaction. Records refused for good are left out
    /// of a second transaction with the rest, and answered as refused; any
    /// other failure aborts the batch, and every record of it is to be sent
    /// again.
    async fn deliver_batch(&self, messages: &[Message]) -> Vec<Outcome> {
        let mut slot = self.take();
        let outcomes = self.batch(&mut slot, messages).await;
        self.idle.lock().expect("not poisoned").push(slot);
        outcomes
    }
}

impl TransactionalSink {
    async fn batch(&self, slot: &mut Slot, messages: &[Message]) -> Vec<Outcome> {
        let all: Vec<&Message> = messages.iter().collect();
        let (failure, refused) = match self.transaction(slot, &all).await {
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
        let second = self.transaction(slot, &rest).await;
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
/// A fenced producer says so: another producer took its id.
fn aborted(cause: &Failure) -> Failure {
    if cause.class == "fenced" {
        return cause.clone();
    }
    Failure {
        kind: FailureKind::Transient,
        class: "aborted",
        counts_against_destination: cause.counts_against_destination,
        retry_after: None,
        detail: format!(
            "kafka: the batch's transaction was aborted: {}",
            cause.detail
        ),
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

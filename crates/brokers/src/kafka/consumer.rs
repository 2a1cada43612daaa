//! The inbox consumer over Kafka.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use inbox::{Consumer as InboxConsumer, ConsumerMetrics, DeadLetter, Incoming, Poison, Verdict};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message as _};
use tokio_util::sync::CancellationToken;

use super::{dead_topic, KafkaConfig};
use crate::{apply, headers, pause, Error, RETRY_DELAY};

/// What one consumer reads.
#[derive(Debug, Clone)]
pub struct KafkaSubscription {
    /// Full topic names, e.g. `order`.
    pub topics: Vec<String>,
    /// The consumer group; partitions are shared among its members.
    pub group: String,
    /// Most messages applied in one inbox transaction.
    pub batch: usize,
}

/// How long the consumer may be unhealthy (its group out of the steady
/// state, or a broker connection holding requests it never sends) before it
/// is replaced. A rebalance or a broker back from a 20 s freeze settles well
/// inside it.
const STUCK_AFTER: Duration = Duration::from_secs(45);

/// How long a stop waits for the consumer to commit and leave its group.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Reports the consumer lag librdkafka computes for each partition, and
/// when the consumer was last healthy.
struct LagReporter {
    consumer: String,
    metrics: ConsumerMetrics,
    health: Mutex<Health>,
}

/// What the statistics said last.
struct Health {
    healthy_at: Instant,
    /// Requests sent and timed out so far, per broker connection.
    sent: BTreeMap<String, (u64, u64)>,
}

/// One broker connection in a statistics report.
struct Link<'a> {
    name: &'a str,
    queued: i64,
    sent: u64,
    timed_out: u64,
}

impl Health {
    /// Whether a report shows a healthy consumer: its group `steady`, and
    /// every connection with requests waiting (queued, or timed out since
    /// the last report) having sent some since. After a broker freeze, one
    /// consumer's group coordinator connection kept 16 requests queued for
    /// minutes while the statistics still called the group steady.
    fn judge<'a>(&mut self, steady: bool, links: impl IntoIterator<Item = Link<'a>>) -> bool {
        let mut stalled = false;
        for l in links {
            let before = self.sent.insert(l.name.to_owned(), (l.sent, l.timed_out));
            if let Some((sent, timed_out)) = before {
                stalled |= (l.queued > 0 || l.timed_out > timed_out) && l.sent == sent;
            }
        }
        steady && !stalled
    }
}

impl ClientContext for LagReporter {
    fn stats(&self, stats: Statistics) {
        {
            let steady = stats
                .cgrp
                .as_ref()
                .is_some_and(|g| g.state == "up" && g.join_state == "steady");
            let links = stats.brokers.iter().map(|(name, b)| Link {
                name,
                queued: b.outbuf_cnt,
                sent: b.tx,
                timed_out: b.req_timeouts,
            });
            let mut health = self.health.lock().expect("never poisoned");
            if health.judge(steady, links) {
                health.healthy_at = Instant::now();
            }
        }
        for (name, topic) in &stats.topics {
            for (id, p) in &topic.partitions {
                // -1 is librdkafka's "unknown", and partition -1 its
                // internal unassigned one.
                if *id >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .set_lag(&self.consumer, &format!("{name}/{id}"), p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for LagReporter {}

/// How a consumer session ended.
enum Ended {
    /// Cancelled, or the stream ended: stop.
    Done,
    /// The consumer has not been healthy for [`STUCK_AFTER`].
    Stuck,
}

/// Runs `inbox` over `subscription` until `cancel`. Offsets are stored only
/// after a batch's inbox transaction commits (and its poison is in the
/// dead-letter topic), and committed from there, so a crash redelivers at
/// most what the inbox already has.
///
/// A consumer that stays unhealthy is replaced by a new one: after a broker
/// freeze librdkafka can keep a group coordinator handle that never sends
/// its queued requests again, and the consumer would sit there with its
/// partitions unread.
pub async fn consume<C: InboxConsumer + ?Sized>(
    config: &KafkaConfig,
    subscription: &KafkaSubscription,
    inbox: &C,
    cancel: CancellationToken,
) -> Result<(), Error> {
    loop {
        match session(config, subscription, inbox, &cancel).await? {
            Ended::Done => return Ok(()),
            Ended::Stuck => {
                tracing::warn!(
                    consumer = inbox.consumer(),
                    group = subscription.group,
                    "the consumer was not healthy for {STUCK_AFTER:?}; starting a new consumer"
                );
                if !pause(RETRY_DELAY, &cancel).await {
                    return Ok(());
                }
            }
        }
    }
}

async fn session<C: InboxConsumer + ?Sized>(
    config: &KafkaConfig,
    subscription: &KafkaSubscription,
    inbox: &C,
    cancel: &CancellationToken,
) -> Result<Ended, Error> {
    let consumer: StreamConsumer<LagReporter> = config
        .client()
        .set("group.id", &subscription.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // The relay publishes each run in a transaction: an aborted run's
        // records are never read (librdkafka's default, said here).
        .set("isolation.level", "read_committed")
        // A member that died hands its partitions over within this.
        .set("session.timeout.ms", "10000")
        // Also the rebalance timeout: how long the coordinator waits for
        // members to rejoin. The 5-minute default kept a consumer restarted
        // across a broker freeze out of its partitions for 80 s. Polls are
        // never that far apart except while the database is down, and then
        // leaving the group and rejoining is right.
        .set("max.poll.interval.ms", "30000")
        .set("statistics.interval.ms", "2000")
        .create_with_context(LagReporter {
            consumer: inbox.consumer().to_owned(),
            metrics: inbox.metrics().clone(),
            health: Mutex::new(Health {
                healthy_at: Instant::now(),
                sent: BTreeMap::new(),
            }),
        })?;
    let topics: Vec<&str> = subscription.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(
        consumer = inbox.consumer(),
        ?topics,
        group = subscription.group,
        "consuming"
    );
    let dead_letters = config.dead_letter_producer()?;
    let mut batches = consumer.stream().ready_chunks(subscription.batch.max(1));
    let mut check = tokio::time::interval(Duration::from_secs(5));
    let mut ended = Ended::Done;
    loop {
        let batch = tokio::select! {
            () = cancel.cancelled() => break,
            _ = check.tick() => {
                let health = consumer.context().health.lock().expect("never poisoned");
                if health.healthy_at.elapsed() > STUCK_AFTER {
                    ended = Ended::Stuck;
                    break;
                }
                continue;
            }
            batch = batches.next() => match batch {
                Some(batch) => batch,
                None => break,
            },
        };
        let mut messages = Vec::with_capacity(batch.len());
        for m in batch {
            match m {
                Ok(m) => messages.push(m.detach()),
                // Broker trouble librdkafka recovers from by itself.
                Err(e) => tracing::warn!(error = %e, "kafka consumer"),
            }
        }
        if messages.is_empty() {
            continue;
        }
        let incoming: Vec<Incoming> = messages.iter().map(incoming).collect();
        let Some(verdicts) = apply(inbox, &incoming, cancel).await else {
            break;
        };
        for ((m, i), v) in messages.iter().zip(&incoming).zip(&verdicts) {
            if let Verdict::Dead(poison) = v {
                if let Buried::Cancelled = bury(&dead_letters, inbox, m, i, poison, cancel).await {
                    return Ok(Ended::Done);
                }
            }
        }
        // The last offset of each partition covers the ones before it.
        let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in &messages {
            last.insert((m.topic(), m.partition()), m.offset());
        }
        for ((topic, partition), offset) in last {
            consumer.store_offset(topic, partition, offset)?;
        }
    }
    drop(batches);
    // Closing a consumer leaves its group through the coordinator, and
    // waits for it: with a stuck coordinator connection, for ever (the
    // fault suite's inventory sat 4 minutes in that drop, on a runtime
    // worker, never starting the new consumer). So it closes on a thread
    // of its own, which a runtime shutting down does not wait for, and a
    // stuck one is not waited for at all: its offsets stored since the
    // last auto-commit are redelivered, and the inbox skips them.
    let done = matches!(ended, Ended::Done);
    let (closed, closing) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            if done {
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    // Nothing stored since the last commit is not an error
                    // worth more.
                    tracing::debug!(error = %e, "final offset commit");
                }
            }
            drop(consumer);
            let _ = closed.send(());
        })?;
    if done && tokio::time::timeout(CLOSE_WITHIN, closing).await.is_err() {
        tracing::warn!("the Kafka consumer did not close within {CLOSE_WITHIN:?}; left closing");
    }
    Ok(ended)
}

fn incoming(m: &OwnedMessage) -> Incoming {
    Incoming {
        id: super::event_id(m),
        payload: m.payload().unwrap_or_default().to_vec(),
        origin: format!("{}/{}@{}", m.topic(), m.partition(), m.offset()),
        signature: super::header(m, headers::SIGNATURE),
    }
}

/// What became of a dead letter.
enum Buried {
    /// It is in `<topic>.dead`, or kept by the consumer: go on.
    Done,
    /// Cancelled first.
    Cancelled,
}

/// Whether the broker (or the producer before it) refuses `e`'s record
/// whatever the retries: then the dead letter is kept by the consumer.
fn refused_for_good(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as Code;
    matches!(
        e.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
                | Code::InvalidMessage
                | Code::InvalidMessageSize
                | Code::TopicAuthorizationFailed
        )
    )
}

/// Produces `m` to its topic's dead-letter topic with the reason, until the
/// broker has it. What the broker refuses for good (a record above its size
/// limit, once the headers are added) the consumer keeps in its database
/// instead, so nothing behind it waits.
async fn bury<C: InboxConsumer + ?Sized>(
    producer: &FutureProducer,
    inbox: &C,
    m: &OwnedMessage,
    i: &Incoming,
    poison: &Poison,
    cancel: &CancellationToken,
) -> Buried {
    let consumer = inbox.consumer();
    let origin = i.origin.as_str();
    tracing::warn!(consumer, origin, %poison, "dead-lettering a message");
    let topic = dead_topic(m.topic());
    loop {
        let mut h = OwnedHeaders::new();
        if let Some(original) = m.headers() {
            for o in original.iter() {
                h = h.insert(Header {
                    key: o.key,
                    value: o.value,
                });
            }
        }
        for (key, value) in [
            (headers::DEAD_CLASS, poison.class),
            (headers::DEAD_REASON, poison.reason.as_str()),
            (headers::DEAD_CONSUMER, consumer),
            (headers::DEAD_ORIGIN, origin),
        ] {
            h = h.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(h);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(payload) = m.payload() {
            record = record.payload(payload);
        }
        match producer.send(record, Duration::from_secs(1)).await {
            Ok(_) => return Buried::Done,
            Err((e, _)) if refused_for_good(&e) => {
                let refused = format!("{topic}: {e}");
                let letter = DeadLetter {
                    origin,
                    message_id: i.id.as_deref(),
                    poison,
                    refused: &refused,
                    key: m.key(),
                    payload: &i.payload,
                };
                loop {
                    match inbox.keep_dead_letter(&letter).await {
                        Ok(()) => return Buried::Done,
                        Err(e) => {
                            tracing::warn!(consumer, error = %e, "dead letter not kept; retrying");
                            if !pause(RETRY_DELAY, cancel).await {
                                return Buried::Cancelled;
                            }
                        }
                    }
                }
            }
            Err((e, _)) => {
                tracing::warn!(error = %e, topic, "dead letter not produced; retrying");
                if !pause(RETRY_DELAY, cancel).await {
                    return Buried::Cancelled;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(queued: i64, sent: u64, timed_out: u64) -> Link<'static> {
        Link {
            name: "GroupCoordinator",
            queued,
            sent,
            timed_out,
        }
    }

    #[test]
    fn a_connection_that_holds_requests_without_sending_any_is_unhealthy() {
        let mut h = Health {
            healthy_at: Instant::now(),
            sent: BTreeMap::new(),
        };
        assert!(
            h.judge(true, [link(16, 40, 0)]),
            "a first report has nothing to compare"
        );
        assert!(
            !h.judge(true, [link(16, 40, 0)]),
            "queued, nothing sent since"
        );
        assert!(
            !h.judge(true, [link(0, 40, 3)]),
            "timed out in the queue, nothing sent"
        );
        assert!(h.judge(true, [link(16, 41, 3)]), "queued but sending");
        assert!(h.judge(true, [link(0, 41, 3)]), "idle");
        assert!(!h.judge(false, [link(0, 42, 3)]), "the group is not steady");
    }
}

//! The poison suite: every consumer (journal, ingestion, the saga's
//! orchestrator, inventory, payments, the notifier), over each broker, is
//! fed the worst messages the broker accepts, then a canary: malformed
//! bodies, properties the client cannot parse, oversized properties, a
//! record just over the client's default limit, a key and a value that
//! together pass it, and, on the saga's signed streams, unsigned and forged
//! messages. The canary must be applied within seconds, each poison must
//! be in the dead letters, and no consumer may be left stalled (what
//! `/readyz` reads).

use std::sync::Arc;
use std::time::{Duration, Instant};

use brokers::kafka::{dead_topic, KafkaConfig, KafkaSubscription};
use brokers::rabbitmq::{dead_queue, RabbitConfig, RabbitSubscription};
use domain::Destination;
use inbox::{Consumer, ConsumerMetrics, Inbox};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use saga::{Kind, SagaMessage, Topic};
use sink::signing::Keyring;
use store::saga::SagaRoute;
use tokio_util::sync::CancellationToken;

/// A consumer under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Journal,
    Ingest,
    Orchestrator,
    Inventory,
    Payments,
    Notifier,
}

impl Target {
    const ALL: [Target; 6] = [
        Target::Journal,
        Target::Ingest,
        Target::Orchestrator,
        Target::Inventory,
        Target::Payments,
        Target::Notifier,
    ];

    fn consumer(self) -> &'static str {
        match self {
            Target::Journal => "journal",
            Target::Ingest => ingest::CONSUMER,
            Target::Orchestrator => orchestrator::CONSUMER,
            Target::Inventory => inventory::CONSUMER,
            Target::Payments => payments::CONSUMER,
            Target::Notifier => notifier::CONSUMER,
        }
    }

    /// The stream it reads here (the orchestrator reads `reserve` too).
    fn stream(self) -> &'static str {
        match self {
            Target::Journal => "order",
            Target::Ingest => ingest::DEFAULT_SOURCE,
            Target::Orchestrator => Topic::Payment.as_str(),
            Target::Inventory => Topic::ReserveCommands.as_str(),
            Target::Payments => Topic::PaymentCommands.as_str(),
            Target::Notifier => Topic::Saga.as_str(),
        }
    }

    /// A saga message of its stream, about `order`.
    fn saga_message(self, order: &str) -> Option<SagaMessage> {
        let m = |kind| SagaMessage::new(kind, order);
        match self {
            Target::Journal | Target::Ingest => None,
            Target::Orchestrator => Some(m(Kind::PaymentFailed).because("no funds")),
            Target::Inventory => Some(m(Kind::ReleaseStock)),
            Target::Payments => Some(m(Kind::RefundPayment)),
            Target::Notifier => Some(m(Kind::OrderCompleted).amount("10".parse().unwrap())),
        }
    }

    /// The canary: (message id, routing key, body), valid for this consumer.
    fn canary(self, tag: &str) -> (String, String, Vec<u8>) {
        let order = format!("CANARY-{tag}");
        let id = format!("canary-{tag}");
        match self {
            Target::Journal => {
                let notice = domain::OrderNotice {
                    idempotent_key: uuid::Uuid::now_v7(),
                    order_id: order,
                    version: 1,
                    status: "new".into(),
                    kind: domain::OrderEvent::Created,
                    previous_status: None,
                    occurred_at: chrono::Utc::now(),
                };
                let id = notice.idempotent_key.to_string();
                (
                    id,
                    "order.created".into(),
                    serde_json::to_vec(&notice).unwrap(),
                )
            }
            Target::Ingest => {
                let mut body = testkit::sample_order(&order);
                body["version"] = 1.into();
                (id, "order".into(), serde_json::to_vec(&body).unwrap())
            }
            _ => {
                let m = self.saga_message(&order).expect("a saga consumer");
                (id, m.kind.as_str().into(), serde_json::to_vec(&m).unwrap())
            }
        }
    }

    /// Whether its stream is signed.
    fn signed(self) -> bool {
        self.saga_message("x").is_some()
    }
}

/// A key for every saga stream.
fn keys() -> Keyring {
    saga::messages::KEY_NAMES
        .iter()
        .map(|name| {
            format!(
                "{name}={}-poison-suite-0123456789abcdef0123",
                name.replace('@', "-")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .unwrap()
}

/// A consumer built as its role builds it, with its database.
struct Running {
    consumer: Arc<dyn Consumer>,
    metrics: ConsumerMetrics,
    pool: Option<sqlx::PgPool>,
    notifier: Option<Arc<notifier::Notifier>>,
}

impl Running {
    async fn of(target: Target, destination: &str) -> Self {
        let metrics = ConsumerMetrics::unregistered();
        let route = SagaRoute::Broker(destination.parse::<Destination>().unwrap());
        let own_db = || async {
            let db = testkit::unmigrated_database().await;
            db.pool
        };
        let (consumer, pool, notifier): (Arc<dyn Consumer>, _, _) = match target {
            Target::Journal | Target::Ingest | Target::Orchestrator => {
                let pool = testkit::database().await.pool;
                let store = store::Store::new(pool.clone());
                let consumer: Arc<dyn Consumer> = match target {
                    Target::Journal => Arc::new(Inbox::new(
                        pool.clone(),
                        "journal",
                        inbox::journal::Journal::new("journal"),
                        metrics.clone(),
                    )),
                    Target::Ingest => Arc::new(Inbox::new(
                        pool.clone(),
                        ingest::CONSUMER,
                        ingest::Ingest::new(store),
                        metrics.clone(),
                    )),
                    _ => Arc::new(Inbox::new(
                        pool.clone(),
                        orchestrator::CONSUMER,
                        orchestrator::Orchestrator::new(store).with_keys(keys()),
                        metrics.clone(),
                    )),
                };
                (consumer, Some(pool), None)
            }
            Target::Inventory => {
                let pool = own_db().await;
                inventory::migrate(&pool).await.unwrap();
                let handler = inventory::Inventory::new(route).with_keys(keys());
                let consumer =
                    Inbox::new(pool.clone(), inventory::CONSUMER, handler, metrics.clone());
                (Arc::new(consumer) as Arc<dyn Consumer>, Some(pool), None)
            }
            Target::Payments => {
                let pool = own_db().await;
                payments::migrate(&pool).await.unwrap();
                let handler = payments::Payments::new(route).with_keys(keys());
                let consumer =
                    Inbox::new(pool.clone(), payments::CONSUMER, handler, metrics.clone());
                (Arc::new(consumer) as Arc<dyn Consumer>, Some(pool), None)
            }
            Target::Notifier => {
                let n = Arc::new(
                    notifier::Notifier::new(None, metrics.clone())
                        .unwrap()
                        .with_keys(keys()),
                );
                (n.clone() as Arc<dyn Consumer>, None, Some(n))
            }
        };
        Self {
            consumer,
            metrics,
            pool,
            notifier,
        }
    }

    /// Whether the canary `(id, order)` took effect.
    async fn applied(&self, target: Target, id: &str, tag: &str) -> bool {
        if let Some(n) = &self.notifier {
            return n.notification(&format!("CANARY-{tag}")).is_some();
        }
        let pool = self.pool.as_ref().expect("a database");
        let id = match target {
            // Ingestion keys its inbox by order and version.
            Target::Ingest => format!("CANARY-{tag}@1"),
            _ => id.to_owned(),
        };
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2)",
        )
        .bind(target.consumer())
        .bind(&id)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// Waits for the canary, up to 60 s; how long it took.
    async fn until_applied(&self, target: Target, id: &str, tag: &str) -> Duration {
        until(
            Duration::from_secs(60),
            &format!("{target:?}'s canary"),
            || self.applied(target, id, tag),
        )
        .await
    }

    /// Waits until no consumer is stalled (what `/readyz` reads).
    async fn until_not_stalled(&self, target: Target) {
        until(
            Duration::from_secs(20),
            &format!("{target:?} not stalled"),
            || async { self.metrics.stalled(Duration::ZERO).is_empty() },
        )
        .await;
    }

    /// Dead letters the consumer kept in its database.
    async fn kept(&self) -> i64 {
        match &self.pool {
            Some(pool) => sqlx::query_scalar("SELECT count(*) FROM dead_letters")
                .fetch_one(pool)
                .await
                .unwrap(),
            None => 0,
        }
    }
}

/// Waits for `done` up to `within`, panicking with `what` after.
async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut done: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// The unsigned and forged copies of a saga consumer's canary.
fn unsigned_and_forged(target: Target, tag: &str) -> Vec<(String, Vec<u8>, Option<String>)> {
    let Some(m) = target.saga_message(&format!("FORGED-{tag}")) else {
        return Vec::new();
    };
    let body = serde_json::to_vec(&m).unwrap();
    let forger: Keyring = format!("{}=not-the-key-0123456789abcdef0123456789", target.stream())
        .parse()
        .unwrap();
    let forged_id = format!("forged-{tag}");
    let forged = forger.sign(target.stream(), &forged_id, &body);
    vec![
        (format!("unsigned-{tag}"), body.clone(), None),
        (forged_id, body, forged),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_consumer_goes_past_the_worst_kafka_messages() {
    let kafka = testkit::kafka().await;
    let runs = Target::ALL.map(|target| async move {
        let mut config = KafkaConfig::new(&kafka.bootstrap_servers());
        config.topic_prefix = testkit::unique_prefix("p");
        config.partitions = 1;
        config.ensure_topics(&[target.stream()]).await.unwrap();
        let topic = config.topic(target.stream());
        let running = Running::of(target, "kafka").await;
        let tag = format!("k-{}", target.consumer());
        let mut poison: Vec<Record> = vec![
            (
                b"P".to_vec(),
                b"{".to_vec(),
                vec![("event-id", b"p-1".to_vec())],
            ),
            (
                b"P".to_vec(),
                b"{}".to_vec(),
                vec![("event-id", vec![0xff, 0xfe])],
            ),
            (
                b"P".to_vec(),
                b"[]".to_vec(),
                vec![("event-id", b"p-3".to_vec()), ("big", vec![b'h'; 500_000])],
            ),
            (
                b"P".to_vec(),
                vec![b'x'; 1_040_000],
                vec![("event-id", b"p-4".to_vec())],
            ),
            (
                vec![b'k'; 500_000],
                vec![b'x'; 500_000],
                vec![("event-id", b"p-5".to_vec())],
            ),
        ];
        for (id, body, signature) in unsigned_and_forged(target, &tag) {
            let mut h = vec![("event-id", id.into_bytes())];
            if let Some(s) = signature {
                h.push(("signature", s.into_bytes()));
            }
            poison.push((b"P".to_vec(), body, h));
        }
        let (id, _, body) = target.canary(&tag);
        let mut canary = vec![("event-id", id.clone().into_bytes())];
        if target.signed() {
            let s = keys().sign(target.stream(), &id, &body).unwrap();
            canary.push(("signature", s.into_bytes()));
        }
        let producer = config.dead_letter_producer().unwrap();
        for (key, body, headers) in poison.iter().chain([&(b"C".to_vec(), body, canary)]) {
            let mut h = OwnedHeaders::new();
            for (k, v) in headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
            producer
                .send(
                    FutureRecord::to(&topic).key(key).payload(body).headers(h),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        let cancel = CancellationToken::new();
        let subscription = KafkaSubscription {
            topics: vec![topic.clone()],
            group: format!("{}{}", config.topic_prefix, target.consumer()),
            batch: 100,
        };
        let task = {
            let (config, cancel, consumer) =
                (config.clone(), cancel.clone(), running.consumer.clone());
            tokio::spawn(async move {
                brokers::kafka::consume(&config, &subscription, &*consumer, cancel)
                    .await
                    .unwrap()
            })
        };
        let took = running.until_applied(target, &id, &tag).await;
        // Every poison dead: in `<topic>.dead`, or kept in the database.
        let dead = dead_topic(&topic);
        let want = poison.len() as i64;
        let buried = || async { count_records(&config, &dead).await + running.kept().await };
        until(
            Duration::from_secs(30),
            &format!("{target:?}'s {want} dead letters"),
            || async { buried().await >= want },
        )
        .await;
        assert_eq!(buried().await, want, "{target:?}: nothing else is dead");
        // Each says why: a dead-reason header, or the kept row's reason.
        let reasons = dead_reasons(&config, &dead, count_records(&config, &dead).await).await;
        assert!(
            reasons.iter().all(|r| !r.is_empty()),
            "{target:?}: {reasons:?}"
        );
        if let Some(pool) = &running.pool {
            let empty: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dead_letters WHERE reason = '' OR refused = ''",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(
                empty, 0,
                "{target:?}: a kept dead letter without its reason"
            );
        }
        assert_eq!(
            running.metrics.count(target.consumer(), "dead"),
            want as u64
        );
        running.until_not_stalled(target).await;
        cancel.cancel();
        task.await.unwrap();
        took
    });
    for took in futures::future::join_all(runs).await {
        assert!(took < Duration::from_secs(30), "a canary took {took:?}");
    }
}

/// A Kafka record to produce: key, body and headers.
type Record = (Vec<u8>, Vec<u8>, Vec<(&'static str, Vec<u8>)>);

/// The `dead-reason` header of the first `n` records of `topic`.
async fn dead_reasons(config: &KafkaConfig, topic: &str, n: i64) -> Vec<String> {
    use futures::StreamExt;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::{Headers as _, Message as _};
    let reader: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("group.id", format!("{topic}-reasons"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[topic]).unwrap();
    let mut stream = reader.stream();
    let mut reasons = Vec::new();
    while (reasons.len() as i64) < n {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the dead letters are readable")
            .unwrap()
            .unwrap();
        let reason = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == brokers::headers::DEAD_REASON))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        reasons.push(reason);
    }
    reasons
}

/// The records in `topic` (one partition), read to its end.
async fn count_records(config: &KafkaConfig, topic: &str) -> i64 {
    let bootstrap = config.bootstrap.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "poison-counter")
            .create()
            .unwrap();
        let (low, high) = c
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .unwrap();
        high - low
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_consumer_goes_past_the_worst_rabbitmq_messages() {
    let rabbit = testkit::rabbitmq().await;
    let port = rabbit.port();
    let runs = Target::ALL.map(|target| async move {
        let mut config = RabbitConfig::new(&rabbit.url());
        config.prefix = testkit::unique_prefix("p");
        let subscription = RabbitSubscription {
            aggregate_type: target.stream().into(),
            events: vec!["#".into()],
            prefetch: 50,
        };
        brokers::rabbitmq::declare(&config, target.consumer(), &subscription)
            .await
            .unwrap();
        let exchange = config.exchange(target.stream());
        let running = Running::of(target, "rabbitmq").await;
        let tag = format!("r-{}", target.consumer());
        let raw = |props: testkit::amqp::RawProperties| {
            testkit::amqp::publish(port, &exchange, "x", &props, b"{}").unwrap()
        };
        let (_connection, channel) = config.confirmed_channel().await.unwrap();
        let publish = |id: String, body: Vec<u8>, headers: Vec<(&'static str, String)>| {
            let channel = channel.clone();
            let exchange = exchange.clone();
            async move {
                let mut table = FieldTable::default();
                for (k, v) in headers {
                    table.insert(
                        ShortString::from(k),
                        AMQPValue::LongString(LongString::from(v.as_str())),
                    );
                }
                let props = lapin::BasicProperties::default()
                    .with_message_id(id.into())
                    .with_headers(table);
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "x".into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                assert!(confirm.is_ack());
            }
        };
        let mut poisons = 0;
        publish("p-1".into(), b"{".to_vec(), vec![]).await;
        raw(testkit::amqp::RawProperties {
            message_id: Some(vec![0xff, 0xfe]),
            ..Default::default()
        });
        raw(testkit::amqp::RawProperties {
            content_type: Some(vec![0xff, 0xfe]),
            message_id: Some(b"p-3".to_vec()),
        });
        publish(
            "p-4".into(),
            b"[]".to_vec(),
            vec![("big", "h".repeat(60_000))],
        )
        .await;
        publish("p-5".into(), vec![b'x'; 1_040_000], vec![]).await;
        poisons += 5;
        for (id, body, signature) in unsigned_and_forged(target, &tag) {
            let headers = signature
                .map(|s| vec![("signature", s)])
                .unwrap_or_default();
            publish(id, body, headers).await;
            poisons += 1;
        }
        let (id, _, body) = target.canary(&tag);
        let headers = if target.signed() {
            vec![(
                "signature",
                keys().sign(target.stream(), &id, &body).unwrap(),
            )]
        } else {
            vec![]
        };
        publish(id.clone(), body, headers).await;

        let cancel = CancellationToken::new();
        let task = {
            let (config, cancel, consumer) =
                (config.clone(), cancel.clone(), running.consumer.clone());
            tokio::spawn(async move {
                brokers::rabbitmq::consume(&config, &subscription, &*consumer, cancel)
                    .await
                    .unwrap()
            })
        };
        let took = running.until_applied(target, &id, &tag).await;
        let dead = dead_queue(&config.queue(target.consumer(), target.stream()));
        until(
            Duration::from_secs(60),
            &format!("{target:?}'s {poisons} dead letters"),
            || {
                let (channel, dead) = (channel.clone(), dead.clone());
                async move {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    let q = channel
                        .queue_declare(dead.as_str().into(), passive, FieldTable::default())
                        .await
                        .unwrap();
                    q.message_count() >= poisons
                }
            },
        )
        .await;
        // Each says why: our dead-reason header, or the broker's x-death
        // reason for what the client could not parse.
        for _ in 0..poisons {
            let letter = testkit::amqp::get(port, &dead)
                .unwrap()
                .expect("a dead letter");
            assert!(
                letter.properties_mention(brokers::headers::DEAD_REASON)
                    || letter.properties_mention("delivery_limit"),
                "{target:?}: a dead letter without its reason: {:?}",
                String::from_utf8_lossy(&letter.properties)
            );
        }
        running.until_not_stalled(target).await;
        cancel.cancel();
        task.await.unwrap();
        took
    });
    for took in futures::future::join_all(runs).await {
        assert!(took < Duration::from_secs(45), "a canary took {took:?}");
    }
}

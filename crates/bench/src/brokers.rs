//! 6 and 7: the relay and the inbox consumer against a real Kafka and a
//! real RabbitMQ (started here), each figure next to the same run's plain
//! client of the broker doing the same work without our machinery:
//!
//! - drain: a backlog of order notices through an in-process relay to the
//!   broker, against a plain producer (Kafka: the same idempotent `acks=all`
//!   producer; RabbitMQ: the same persistent, confirmed publishes);
//! - apply: the journal consumer applying those messages through its inbox,
//!   against a plain consumer that only reads and acknowledges them;
//! - latency: saves at 500/s through the store, relay to broker to journal,
//!   commit to the journal's commit, against a plain produce-to-consume
//!   round trip at the same rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use brokers::kafka::{KafkaConfig, KafkaSubscription, TransactionalSink};
use brokers::rabbitmq::{RabbitConfig, RabbitSink, RabbitSubscription};
use domain::{DeliveryPolicy, OrderEvent};
use futures::{StreamExt, TryStreamExt};
use inbox::journal::Journal;
use inbox::local::LocalSink;
use inbox::{ConsumerMetrics, Inbox};
use relay::{Leadership, Outlet, ProtectionConfig, Relay};
use sqlx::PgPool;
use store::{Precondition, SaveContext, Store};
use tokio_util::sync::CancellationToken;

use crate::scenarios::{figure, latency_order, percentile, relay_config, warm_up_saves};
use crate::Figure;

/// A transport under measurement: a broker, or the PostgreSQL transport
/// (the relay applies each run to the journal's inbox itself), which has
/// no broker and no plain client.
pub enum Broker {
    Kafka(ephemeral_infra::Kafka, KafkaConfig),
    RabbitMq(ephemeral_infra::RabbitMq, RabbitConfig),
    Postgres,
}

impl Broker {
    pub async fn kafka() -> Result<Self> {
        let k = tokio::task::spawn_blocking(ephemeral_infra::Kafka::start).await??;
        let config = KafkaConfig::new(&k.bootstrap_servers());
        Self::Kafka(k, config).warmed_up().await
    }

    pub async fn rabbitmq() -> Result<Self> {
        let r = tokio::task::spawn_blocking(ephemeral_infra::RabbitMq::start).await??;
        let config = RabbitConfig::new(&r.url());
        Self::RabbitMq(r, config).warmed_up().await
    }

    /// The broker after rounds of 50,000 plain publishes to names of their
    /// own, until a round is no more than 10% faster than the one before
    /// (five rounds at most). A broker has just started here: during a
    /// drain to a cold Kafka, its JIT compiler threads took 14% of both
    /// cores (perf), and a plain producer ran at a fifth of its warm rate.
    /// One round was not always enough: in one full run it went at 13,423
    /// msg/s (27,700-29,300 in others) and the drain after it at half its
    /// usual rate. A deployed broker is warm, and so is the one the plain
    /// clients' ceilings are measured on.
    async fn warmed_up(mut self) -> Result<Self> {
        const ROUND: i64 = 50_000;
        let name = self.name();
        self.fresh("warm-up");
        self.prepare().await?;
        let mut rates: Vec<f64> = Vec::new();
        while rates.len() < 5 {
            rates.push(plain_publish(&self, ROUND).await?);
            if let [.., before, last] = rates[..] {
                if last <= before * 1.1 {
                    break;
                }
            }
        }
        let rates: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        eprintln!(
            "{name}: warmed up with rounds of {ROUND} plain publishes at {} msg/s",
            rates.join(", ")
        );
        self.fresh("");
        Ok(self)
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Kafka(..) => "kafka",
            Self::RabbitMq(..) => "rabbitmq",
            Self::Postgres => "postgres",
        }
    }

    /// The destination its events are routed to.
    fn destination(&self) -> domain::Destination {
        let name = match self {
            Self::Postgres => "journal",
            _ => self.name(),
        };
        name.parse().expect("a destination name")
    }

    /// Its URL, as `--broker` takes it.
    pub(crate) fn url(&self) -> String {
        match self {
            Self::Kafka(k, _) => format!("kafka://{}", k.bootstrap_servers()),
            Self::RabbitMq(r, _) => r.url(),
            Self::Postgres => String::new(),
        }
    }

    /// The same broker with names no earlier run used (`run-`; none with
    /// an empty `run`).
    pub(crate) fn fresh(&mut self, run: &str) {
        let prefix = if run.is_empty() {
            String::new()
        } else {
            format!("{run}-")
        };
        match self {
            Self::Kafka(_, c) => c.topic_prefix = prefix,
            Self::RabbitMq(_, c) => c.prefix = prefix,
            Self::Postgres => {}
        }
    }

    pub(crate) async fn prepare(&self) -> Result<()> {
        match self {
            Self::Kafka(_, c) => c.ensure_topics(&["order"]).await?,
            Self::RabbitMq(_, c) => {
                brokers::rabbitmq::declare(c, "journal", &rabbit_subscription()).await?
            }
            Self::Postgres => {}
        }
        Ok(())
    }

    /// The relay's outlet; the PostgreSQL transport applies to the
    /// journal's inbox on `pool`, counted in `metrics`.
    fn outlet(&self, pool: &PgPool, metrics: &ConsumerMetrics) -> Result<Outlet> {
        let sink: Arc<dyn sink::Sink> = match self {
            Self::Kafka(_, c) => Arc::new(TransactionalSink::new(c.clone(), "bench", "kafka")?),
            Self::RabbitMq(_, c) => Arc::new(RabbitSink::new(c.clone())),
            Self::Postgres => Arc::new(LocalSink::new(journal(pool, metrics))),
        };
        Ok(Outlet {
            destination: self.destination(),
            policy: DeliveryPolicy::EveryMessageInOrder,
            sink,
            protection: ProtectionConfig {
                max_in_flight: 2000,
                rate_per_second: None,
                breaker: worker::BreakerConfig {
                    failure_threshold: 1000,
                    cool_down: Duration::from_secs(1),
                },
            },
        })
    }

    /// Runs the journal until `cancel`.
    fn spawn_journal(
        &self,
        pool: &PgPool,
        metrics: ConsumerMetrics,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let inbox = journal(pool, &metrics);
        match self {
            Self::Kafka(_, c) => {
                let (c, sub) = (c.clone(), kafka_subscription(c, "journal"));
                tokio::spawn(
                    async move { Ok(brokers::kafka::consume(&c, &sub, &inbox, cancel).await?) },
                )
            }
            Self::RabbitMq(_, c) => {
                let c = c.clone();
                tokio::spawn(async move {
                    Ok(
                        brokers::rabbitmq::consume(&c, &rabbit_subscription(), &inbox, cancel)
                            .await?,
                    )
                })
            }
            // The relay applies to the inbox itself.
            Self::Postgres => tokio::spawn(async move {
                cancel.cancelled().await;
                Ok(())
            }),
        }
    }

    pub(crate) fn stop(self) {
        match self {
            Self::Kafka(k, _) => k.stop(),
            Self::RabbitMq(r, _) => r.stop(),
            Self::Postgres => {}
        }
    }
}

/// The journal consumer's inbox on `pool`.
fn journal(pool: &PgPool, metrics: &ConsumerMetrics) -> Inbox<Journal> {
    Inbox::new(
        pool.clone(),
        "journal",
        Journal::new("journal"),
        metrics.clone(),
    )
}

fn kafka_subscription(c: &KafkaConfig, group: &str) -> KafkaSubscription {
    KafkaSubscription {
        topics: vec![c.topic("order")],
        group: format!("{}{group}", c.topic_prefix),
        batch: 500,
    }
}

fn rabbit_subscription() -> RabbitSubscription {
    RabbitSubscription {
        aggregate_type: "order".into(),
        events: OrderEvent::ALL.map(|e| e.as_str().to_owned()).to_vec(),
        prefetch: 500,
    }
}

/// A notice body the size of a real one.
fn body(i: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "idempotent_key": uuid::Uuid::now_v7(), "order_id": format!("P-{i}"), "version": 1,
        "status": "new", "type": "order.created", "occurred_at": chrono::Utc::now(),
    }))
    .expect("serializable")
}

pub async fn run(broker: &mut Broker, n: i64, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let name = broker.name();
    let (drain_target, ceiling_name) = match broker {
        Broker::Kafka(..) => (20_000.0, "plain idempotent producer"),
        Broker::RabbitMq(..) => (10_000.0, "plain confirmed publisher"),
        Broker::Postgres => anyhow::bail!("the PostgreSQL transport drains in `log::run`"),
    };
    let scenario = format!("6 {name}");
    eprintln!("{name}: relaying {n} events from the log");

    // The drain, then the journal applying what it sent.
    broker.fresh(&format!("drain{n}"));
    broker.prepare().await?;
    let db = testkit::database().await;
    crate::log::prefill_log(&db.pool, name, "B-", n).await?;
    let shutdown = CancellationToken::new();
    let unused = ConsumerMetrics::unregistered();
    let relay = Relay::start(
        Store::new(db.pool.clone()),
        vec![broker.outlet(&db.pool, &unused)?],
        relay_config(500, 3),
        Leadership::always(),
        shutdown.clone(),
    );
    let started = Instant::now();
    while (relay.metrics().delivered_total(name) as i64) < n {
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "drain to {name} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain = n as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    relay.stopped().await?;
    out.push(figure(
        &scenario,
        &format!("{n} events relayed"),
        drain,
        "msg/s",
        (!quick).then_some((
            if drain_target > 15_000.0 {
                "≥ 20000"
            } else {
                "≥ 10000"
            },
            drain >= drain_target,
        )),
    ));

    eprintln!("{name}: applying them through the inbox");
    let metrics = ConsumerMetrics::unregistered();
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let journal = broker.spawn_journal(&db.pool, metrics.clone(), cancel.clone());
    while (metrics.count("journal", "applied") as i64) < n {
        ensure!(
            started.elapsed() < Duration::from_secs(600) && !journal.is_finished(),
            "the journal did not apply everything: {} applied, {} duplicates, {} dead",
            metrics.count("journal", "applied"),
            metrics.count("journal", "duplicate"),
            metrics.count("journal", "dead"),
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let apply = n as f64 / started.elapsed().as_secs_f64();
    cancel.cancel();
    journal.await??;
    let rows: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM order_journal")
        .fetch_one(&db.pool)
        .await?;
    ensure!(rows == n, "{rows} of {n} events journaled");
    // The plain clients after the journal, so that it sees only the relay's
    // messages.
    eprintln!("{name}: plain clients");
    let ceiling = plain_publish(broker, n).await?;
    out.push(figure(&scenario, ceiling_name, ceiling, "msg/s", None));
    let kept = drain / ceiling;
    let (floor, target) = match broker {
        Broker::Kafka(..) => (0.7, "≥ 0.7"),
        _ => (0.8, "≥ 0.8"),
    };
    out.push(figure(
        &scenario,
        &format!("drain / {ceiling_name}"),
        kept,
        "ratio",
        (!quick).then_some((target, kept >= floor)),
    ));
    let read = plain_consume(broker, n).await?;
    out.push(figure(
        &scenario,
        &format!("{n} messages applied through the inbox"),
        apply,
        "msg/s",
        (!quick).then_some(("≥ 10000", apply >= 10_000.0)),
    ));
    out.push(figure(
        &scenario,
        "plain consumer, read and ack",
        read,
        "msg/s",
        None,
    ));
    Ok(())
}

/// Publishes `n` notices with no relay and no database; returns msg/s.
pub(crate) async fn plain_publish(broker: &Broker, n: i64) -> Result<f64> {
    plain_publish_to(broker, "order", "order.created", n, |i| {
        (format!("P-{i}"), body(i))
    })
    .await
}

/// Publishes `n` messages `message(i)` = (key, body) to the topic or
/// exchange of `aggregate` (routing key `routing_key`), 2,000 in flight;
/// returns msg/s. Kafka keeps each key's messages in order.
pub(crate) async fn plain_publish_to(
    broker: &Broker,
    aggregate: &str,
    routing_key: &str,
    n: i64,
    message: impl Fn(i64) -> (String, Vec<u8>),
) -> Result<f64> {
    const WINDOW: usize = 2000;
    let message = &message;
    let started = Instant::now();
    match broker {
        Broker::Kafka(_, c) => {
            let producer = c.producer()?;
            let topic = c.topic(aggregate);
            futures::stream::iter(0..n)
                .map(|i| {
                    let (producer, topic) = (&producer, &topic);
                    let (key, payload) = message(i);
                    async move {
                        producer
                            .send(
                                rdkafka::producer::FutureRecord::to(topic)
                                    .key(&key)
                                    .payload(&payload),
                                Duration::from_secs(5),
                            )
                            .await
                            .map_err(|(e, _)| e)
                    }
                })
                .buffered(WINDOW)
                .try_collect::<Vec<_>>()
                .await?;
        }
        Broker::RabbitMq(_, c) => {
            let (connection, channel) = c.confirmed_channel().await?;
            let exchange = c.exchange(aggregate);
            futures::stream::iter(0..n)
                .map(|i| {
                    let (channel, exchange) = (&channel, &exchange);
                    let (_, payload) = message(i);
                    async move {
                        let confirm = channel
                            .basic_publish(
                                exchange.as_str().into(),
                                routing_key.into(),
                                lapin::options::BasicPublishOptions {
                                    mandatory: true,
                                    ..Default::default()
                                },
                                &payload,
                                lapin::BasicProperties::default().with_delivery_mode(2),
                            )
                            .await?
                            .await?;
                        ensure!(confirm.is_ack(), "nacked");
                        anyhow::Ok(())
                    }
                })
                .buffered(WINDOW)
                .try_collect::<Vec<_>>()
                .await?;
            connection.close(200, "done".into()).await?;
        }
        Broker::Postgres => anyhow::bail!("the PostgreSQL transport has no plain client"),
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Reads and acknowledges `n` messages with a plain consumer (Kafka: a
/// new group from the start of the topic; RabbitMQ: what the plain
/// publisher left in the journal's queue); returns msg/s.
async fn plain_consume(broker: &Broker, n: i64) -> Result<f64> {
    let started = Instant::now();
    match broker {
        Broker::Kafka(_, c) => {
            use rdkafka::consumer::{Consumer, StreamConsumer};
            let consumer: StreamConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &c.bootstrap)
                .set("group.id", format!("{}plain", c.topic_prefix))
                .set("auto.offset.reset", "earliest")
                .create()?;
            consumer.subscribe(&[&c.topic("order")])?;
            // The topic holds the relay's n and the plain producer's n.
            let mut stream = consumer.stream();
            let mut read = 0;
            while read < n {
                // Transient client reports are skipped, as the relay does.
                if stream.next().await.expect("a message").is_ok() {
                    read += 1;
                }
            }
        }
        Broker::RabbitMq(_, c) => {
            let connection =
                lapin::Connection::connect(&c.url, lapin::ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(500, lapin::options::BasicQosOptions::default())
                .await?;
            let mut deliveries = channel
                .basic_consume(
                    c.queue("journal", "order").as_str().into(),
                    "plain".into(),
                    lapin::options::BasicConsumeOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await?;
            for i in 0..n {
                let d = deliveries.next().await.expect("a delivery")?;
                if i % 250 == 249 || i == n - 1 {
                    d.acker
                        .ack(lapin::options::BasicAckOptions { multiple: true })
                        .await?;
                }
            }
            connection.close(200, "done".into()).await?;
        }
        Broker::Postgres => anyhow::bail!("the PostgreSQL transport has no plain client"),
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Saves at `rate` per second for `seconds` through the store, relayed to
/// the broker and applied by the journal; commit-to-journal latency, on
/// the database's clock, next to a plain round trip at the same rate.
pub async fn latency(
    broker: &mut Broker,
    rate: u64,
    seconds: u64,
    quick: bool,
    out: &mut Vec<Figure>,
) -> Result<()> {
    let name = broker.name();
    broker.fresh(&format!("latency{rate}"));
    broker.prepare().await?;
    testkit::settle().await;
    let db = testkit::database().await;
    let destination = broker.destination();
    let routes = OrderEvent::ALL
        .into_iter()
        .fold(domain::Routes::none(), |r, e| {
            r.with(e, destination.clone())
        });
    let store = Store::new(db.pool.clone()).with_routes(routes);
    let shutdown = CancellationToken::new();
    let metrics = ConsumerMetrics::unregistered();
    let relay = Relay::start(
        store.clone(),
        vec![broker.outlet(&db.pool, &metrics)?],
        relay_config(100, 3),
        Leadership::always(),
        shutdown.clone(),
    );
    let journal = broker.spawn_journal(&db.pool, metrics.clone(), shutdown.clone());
    // One save through the whole path first: the clock starts once the
    // producer has its id and the consumer its partitions.
    save(&store, "WARM").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metrics.count("journal", "applied") < 1 {
        ensure!(Instant::now() < deadline, "the warm-up save never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    eprintln!("{name}: {rate} saves/s for {seconds} s");
    // As in the 1C latency scenario: the measured window follows a warm-up
    // at the same rate, whose saves are left out of the figures.
    let warm = warm_up_saves(rate, quick);
    let total = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = tokio::time::Instant::now();
    let mut saves = Vec::with_capacity((warm + total) as usize);
    for i in 0..warm + total {
        tokio::time::sleep_until(started + period * i as u32).await;
        let store = store.clone();
        saves.push(tokio::spawn(async move {
            save(&store, &latency_order(i, warm)).await
        }));
    }
    for s in saves {
        s.await??;
    }
    let achieved = (warm + total) as f64 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metrics.count("journal", "applied") < warm + total + 1 {
        ensure!(
            Instant::now() < deadline,
            "not every save reached the journal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    relay.stopped().await?;
    journal.await??;
    // From the save's commit to the commit of the journal's transaction
    // that applied it, both as PostgreSQL recorded them. A server without
    // commit timestamps gives the transactions' starts instead, which adds
    // the save's own duration.
    let commit_times: String = sqlx::query_scalar("SHOW track_commit_timestamp")
        .fetch_one(&db.pool)
        .await?;
    let (from, to) = if commit_times == "on" {
        (
            "pg_xact_commit_timestamp(o.xmin)",
            "pg_xact_commit_timestamp(j.xmin)",
        )
    } else {
        eprintln!("{name}: track_commit_timestamp is off; timing from the save's start");
        ("o.created_at", "j.recorded_at")
    };
    let mut lat: Vec<f64> = sqlx::query_scalar(&format!(
        "SELECT extract(epoch FROM {to} - {from})::float8 * 1000
         FROM order_journal j JOIN orders o ON o.id = j.order_id
         WHERE j.order_id LIKE 'L-%'"
    ))
    .fetch_all(&db.pool)
    .await?;
    ensure!(
        lat.len() as u64 == total,
        "{} of {total} latencies",
        lat.len()
    );
    lat.sort_by(f64::total_cmp);
    let plain = match broker {
        Broker::Postgres => None,
        _ => Some(plain_round_trip(broker, rate, seconds.min(10)).await?),
    };

    let scenario = format!("7 {name} latency at {rate} saves/s");
    let p99 = percentile(&lat, 0.99);
    out.push(figure(
        &scenario,
        "saves/s achieved",
        achieved,
        "save/s",
        None,
    ));
    out.push(figure(
        &scenario,
        "p50 commit → journal",
        percentile(&lat, 0.5),
        "ms",
        None,
    ));
    out.push(figure(
        &scenario,
        "p99 commit → journal",
        p99,
        "ms",
        (!quick && rate == 500).then_some(("≤ 30", p99 <= 30.0)),
    ));
    if let Some((p50, p99)) = plain {
        for (metric, value) in [
            ("plain produce → consume p50", p50),
            ("plain produce → consume p99", p99),
        ] {
            out.push(figure(&scenario, metric, value, "ms", None));
        }
    }
    Ok(())
}

/// Saves order `id` through the store, as the API would.
async fn save(store: &Store, id: &str) -> Result<()> {
    let full: domain::OrderFull =
        serde_json::from_value(testkit::sample_order(id)).expect("a sample order");
    let order = full
        .validate(Some(&domain::OrderId::parse(id).expect("an id")))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let ctx = SaveContext {
        user_id: "bench".into(),
        traceparent: None,
    };
    store.save_order(&order, Precondition::None, &ctx).await?;
    Ok(())
}

/// p50 and p99 of a plain publish-to-receive at `rate` for `seconds`.
pub(crate) async fn plain_round_trip(
    broker: &mut Broker,
    rate: u64,
    seconds: u64,
) -> Result<(f64, f64)> {
    broker.fresh(&format!("plainrt{rate}"));
    broker.prepare().await?;
    let total = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let epoch = Instant::now();
    let stamp = move || epoch.elapsed().as_secs_f64() * 1000.0;
    // Message 0 warms the path up and is not measured.
    let warm = Arc::new(tokio::sync::Notify::new());
    // The receiver records now minus the sent stamp carried in the body.
    let receiver: tokio::task::JoinHandle<Result<Vec<f64>>> = match broker {
        Broker::Kafka(_, c) => {
            use rdkafka::consumer::{Consumer, StreamConsumer};
            use rdkafka::Message as _;
            let consumer: StreamConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &c.bootstrap)
                .set("group.id", format!("{}rt", c.topic_prefix))
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", "5")
                .create()?;
            consumer.subscribe(&[&c.topic("order")])?;
            let warm = warm.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut stream = consumer.stream();
                while (lat.len() as u64) < total + 1 {
                    // Errors here are the client's transient reports (e.g.
                    // a topic not yet known to the broker); it recovers.
                    let Ok(m) = stream.next().await.expect("a message") else {
                        continue;
                    };
                    let sent: f64 =
                        std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
                    lat.push(stamp() - sent);
                    warm.notify_one();
                }
                Ok(lat.split_off(1))
            })
        }
        Broker::RabbitMq(_, c) => {
            let connection =
                lapin::Connection::connect(&c.url, lapin::ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            let mut deliveries = channel
                .basic_consume(
                    c.queue("journal", "order").as_str().into(),
                    "rt".into(),
                    lapin::options::BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            let warm = warm.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while (lat.len() as u64) < total + 1 {
                    let d = deliveries.next().await.expect("a delivery")?;
                    let sent: f64 = std::str::from_utf8(&d.data)?.parse()?;
                    lat.push(stamp() - sent);
                    warm.notify_one();
                }
                drop(connection);
                Ok(lat.split_off(1))
            })
        }
        Broker::Postgres => anyhow::bail!("the PostgreSQL transport has no plain client"),
    };
    match broker {
        Broker::Kafka(_, c) => {
            let producer = c.producer()?;
            let topic = c.topic("order");
            paced(total, period, &warm, |i| {
                let (producer, topic) = (producer.clone(), topic.clone());
                async move {
                    let payload = stamp().to_string();
                    producer
                        .send(
                            rdkafka::producer::FutureRecord::to(&topic)
                                .key(&format!("P-{i}"))
                                .payload(&payload),
                            Duration::from_secs(5),
                        )
                        .await
                        .map_err(|(e, _)| e)?;
                    anyhow::Ok(())
                }
            })
            .await?;
        }
        Broker::RabbitMq(_, c) => {
            let (_connection, channel) = c.confirmed_channel().await?;
            let exchange = c.exchange("order");
            paced(total, period, &warm, |_| {
                let (channel, exchange) = (channel.clone(), exchange.clone());
                async move {
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "order.created".into(),
                            lapin::options::BasicPublishOptions::default(),
                            stamp().to_string().as_bytes(),
                            lapin::BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?
                        .await?;
                    ensure!(confirm.is_ack(), "nacked");
                    anyhow::Ok(())
                }
            })
            .await?;
        }
        Broker::Postgres => anyhow::bail!("the PostgreSQL transport has no plain client"),
    }
    let mut lat = tokio::time::timeout(Duration::from_secs(60), receiver).await???;
    lat.sort_by(f64::total_cmp);
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99)))
}

/// Sends message 0, waits until `warm` says it arrived, then sends 1 to
/// `total` one `period` apart, each on its own task; waits for every send.
async fn paced<F, Fut>(
    total: u64,
    period: Duration,
    warm: &tokio::sync::Notify,
    send: F,
) -> Result<()>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut sends = vec![tokio::spawn(send(0))];
    tokio::time::timeout(Duration::from_secs(60), warm.notified()).await?;
    let started = tokio::time::Instant::now();
    for i in 1..=total {
        tokio::time::sleep_until(started + period * (i - 1) as u32).await;
        sends.push(tokio::spawn(send(i)));
    }
    for s in sends {
        s.await??;
    }
    Ok(())
}

/// Runs every broker figure on `broker`, then stops it.
pub async fn run_all(
    mut broker: Broker,
    sizes: &crate::Sizes,
    quick: bool,
    out: &mut Vec<Figure>,
) -> Result<()> {
    run(&mut broker, sizes.broker_events, quick, out).await?;
    latency(
        &mut broker,
        sizes.rates[0],
        sizes.latency_seconds,
        quick,
        out,
    )
    .await?;
    tokio::task::spawn_blocking(move || broker.stop()).await?;
    Ok(())
}

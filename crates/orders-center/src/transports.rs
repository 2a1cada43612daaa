//! What serves each routed destination, and what feeds each consumer: the
//! sinks the relays deliver through, picked by destination name, and the
//! consumers (journal, saga orchestrator, inventory, payments, notifier)
//! over the configured broker.

use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use brokers::kafka::KafkaSubscription;
use brokers::rabbitmq::{RabbitSink, RabbitSubscription};
use brokers::Broker;
use domain::{DeliveryPolicy, Destination, OrderEvent, ORDER_AGGREGATE};
use inbox::journal::Journal;
use inbox::local::LocalSink;
use inbox::{Consumer, ConsumerMetrics, Inbox};
use saga::Topic;
use sink::signing::{Keyring, Signing};
use sqlx::PgPool;
use store::saga::SagaRoute;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RelayTuning};

/// The consumer that records order events.
pub const JOURNAL: &str = "journal";

/// The consumer series of this process, on the default registry.
pub fn consumer_metrics() -> ConsumerMetrics {
    static METRICS: OnceLock<ConsumerMetrics> = OnceLock::new();
    METRICS
        .get_or_init(|| {
            ConsumerMetrics::register(prometheus::default_registry())
                .expect("consumer metrics register once")
        })
        .clone()
}

/// The consumers that live in other databases (or, for the notifier, in
/// this process) when the saga runs over PostgreSQL in one process (`dev`).
#[derive(Clone)]
pub struct LocalPeers {
    /// The orders database, where the orchestrator's inbox is.
    pub orders: store::Store,
    /// inventory's database.
    pub inventory: PgPool,
    /// payments' database.
    pub payments: PgPool,
    /// The notifier.
    pub notifier: Arc<notifier::Notifier>,
}

/// The saga orchestrator's inbox in the orders database.
pub fn saga_inbox(orders: &store::Store, keys: &Keyring) -> Inbox<orchestrator::Orchestrator> {
    Inbox::new(
        orders.pool().clone(),
        orchestrator::CONSUMER,
        orchestrator::Orchestrator::new(orders.clone()).with_keys(keys.clone()),
        consumer_metrics(),
    )
}

/// inventory's inbox, answering along `route`.
pub fn inventory_inbox(
    pool: &PgPool,
    route: SagaRoute,
    keys: &Keyring,
) -> Inbox<inventory::Inventory> {
    Inbox::new(
        pool.clone(),
        inventory::CONSUMER,
        inventory::Inventory::new(route).with_keys(keys.clone()),
        consumer_metrics(),
    )
}

/// payments' inbox, answering along `route`.
pub fn payments_inbox(
    pool: &PgPool,
    route: SagaRoute,
    keys: &Keyring,
) -> Inbox<payments::Payments> {
    Inbox::new(
        pool.clone(),
        payments::CONSUMER,
        payments::Payments::new(route).with_keys(keys.clone()),
        consumer_metrics(),
    )
}

/// Ingestion's inbox, a batch split over `transactions` by order.
pub fn ingest_inbox(store: &store::Store, transactions: usize) -> Inbox<ingest::Ingest> {
    Inbox::new(
        store.pool().clone(),
        ingest::CONSUMER,
        ingest::Ingest::new(store.clone()),
        consumer_metrics(),
    )
    .with_transactions(transactions)
}

pub fn journal_inbox(store: &store::Store) -> Inbox<Journal> {
    Inbox::new(
        store.pool().clone(),
        JOURNAL,
        Journal::new(JOURNAL),
        consumer_metrics(),
    )
}

/// Every aggregate type (Kafka topic, RabbitMQ exchange) orders-center
/// and its services publish.
fn aggregate_types() -> Vec<&'static str> {
    std::iter::once(ORDER_AGGREGATE)
        .chain(Topic::ALL.iter().map(|t| t.as_str()))
        .collect()
}

/// An outlet for every destination the orders database's rows name: the
/// routes of order events (1C through `onec`) and, when sagas run, their
/// commands and outcomes. A destination without a sink is a configuration
/// error, not rows that nobody would ever deliver.
pub async fn outlets(
    config: &Config,
    tuning: &RelayTuning,
    store: &store::Store,
    onec: impl FnOnce() -> Result<onec::HttpOnecClient>,
    peers: Option<&LocalPeers>,
) -> Result<Vec<relay::Outlet>> {
    let mut destinations = config.routes().all_destinations();
    if let Some(route) = config.saga().route {
        destinations.extend(route.destinations_of(&[
            Topic::ReserveCommands,
            Topic::PaymentCommands,
            Topic::Saga,
        ]));
    }
    destinations.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    destinations.dedup();
    let mut onec = Some(onec);
    let mut outlets = Vec::new();
    for destination in destinations {
        if destination.as_str() == domain::ONEC {
            let client = onec.take().expect("one 1C destination")()?;
            outlets.push(tuning.onec_outlet(client));
            continue;
        }
        outlets.push(outlet(config, tuning, store, destination, peers).await?);
    }
    Ok(outlets)
}

/// The outlets of a service database (inventory, payments): its answers
/// on `answers`, to the broker or, over PostgreSQL, to the inbox of each
/// of their readers.
pub async fn service_outlets(
    config: &Config,
    tuning: &RelayTuning,
    store: &store::Store,
    answers: Topic,
    peers: Option<&LocalPeers>,
) -> Result<Vec<relay::Outlet>> {
    let route = config
        .saga_route()
        .context("the saga's services need --broker (or `orders-center dev`)")?;
    let mut outlets = Vec::new();
    for destination in route.destinations_of(&[answers]) {
        outlets.push(outlet(config, tuning, store, destination, peers).await?);
    }
    Ok(outlets)
}

/// An every-message-in-order outlet to `destination`, other than 1C.
async fn outlet(
    config: &Config,
    tuning: &RelayTuning,
    store: &store::Store,
    destination: Destination,
    peers: Option<&LocalPeers>,
) -> Result<relay::Outlet> {
    let local = |name: &str| {
        peers.with_context(|| {
            format!("rows for {name:?} are delivered in PostgreSQL only inside `orders-center dev`; elsewhere give --broker")
        })
    };
    let keys = config.keys();
    let sink: Arc<dyn sink::Sink> = match (destination.as_str(), &config.broker) {
        ("kafka", Some(Broker::Kafka { bootstrap })) => {
            let kafka = config.kafka(bootstrap);
            // The relay may start before the broker; the sink then
            // fails and retries like any delivery.
            if let Err(e) = kafka.ensure_topics(&aggregate_types()).await {
                tracing::warn!(error = %e, "could not create the Kafka topics yet");
            }
            let log = store.log_shape().await?.id.to_string();
            Arc::new(brokers::kafka::TransactionalSink::new(
                kafka, &log, "kafka",
            )?)
        }
        ("rabbitmq", Some(Broker::RabbitMq { url })) => {
            Arc::new(RabbitSink::new(config.rabbitmq(url)))
        }
        (JOURNAL, _) => Arc::new(LocalSink::new(journal_inbox(store))),
        (name @ "inventory", _) => Arc::new(LocalSink::one_at_a_time(inventory_inbox(
            &local(name)?.inventory,
            SagaRoute::Local,
            &keys,
        ))),
        (name @ "payments", _) => Arc::new(LocalSink::one_at_a_time(payments_inbox(
            &local(name)?.payments,
            SagaRoute::Local,
            &keys,
        ))),
        (name @ "notifier", _) => Arc::new(LocalSink::one_at_a_time(local(name)?.notifier.clone())),
        (name @ "saga", _) => Arc::new(LocalSink::one_at_a_time(saga_inbox(
            &local(name)?.orders,
            &keys,
        ))),
        (other, _) => bail!(
            "events are routed to {other:?}, which has no sink here: route to onec, \
             journal, or the destination of --broker (kafka or rabbitmq)"
        ),
    };
    // What this process publishes on a stream with a key goes out signed,
    // and its ReserveStock endorsed as the charge payments may make.
    let sink: Arc<dyn sink::Sink> = if keys.is_empty() {
        sink
    } else {
        Arc::new(Signing::new(sink, keys).endorsing(
            Topic::ReserveCommands.as_str(),
            Topic::PaymentCommands.as_str(),
        ))
    };
    Ok(relay::Outlet {
        destination,
        policy: DeliveryPolicy::EveryMessageInOrder,
        sink,
        protection: tuning.broker_protection(),
    })
}

/// What a consumer reads: an aggregate type (Kafka topic, RabbitMQ
/// exchange) and the events (routing keys) it takes from it.
#[derive(Debug, Clone)]
pub struct Stream {
    aggregate_type: String,
    events: Vec<String>,
}

impl Stream {
    /// Every order event.
    pub fn orders() -> Vec<Stream> {
        vec![Stream {
            aggregate_type: ORDER_AGGREGATE.into(),
            events: OrderEvent::ALL.map(|e| e.as_str().to_owned()).to_vec(),
        }]
    }

    /// Whatever is published to `source` (every routing key on RabbitMQ).
    pub fn ingest(source: &str) -> Vec<Stream> {
        vec![Stream {
            aggregate_type: source.to_owned(),
            events: vec!["#".into()],
        }]
    }

    /// The saga messages on `topics` that `reader` reads.
    pub fn saga(reader: &str, topics: &[Topic]) -> Vec<Stream> {
        topics
            .iter()
            .map(|t| Stream {
                aggregate_type: t.as_str().into(),
                events: t
                    .kinds_for(reader)
                    .iter()
                    .map(|k| k.as_str().to_owned())
                    .collect(),
            })
            .collect()
    }
}

/// Warns once, at start, for each of `topics` this process reads without
/// a key: anyone who can publish there can write as its sender.
pub fn warn_unsigned(keys: &Keyring, topics: &[Topic]) {
    for topic in topics.iter().filter(|t| !keys.covers(t.as_str())) {
        tracing::warn!(
            topic = topic.as_str(),
            "saga messages on this topic are accepted unsigned: give SAGA_KEYS a key for it"
        );
    }
}

/// A broker with this process's names.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Kafka.
    Kafka(brokers::kafka::KafkaConfig),
    /// RabbitMQ.
    RabbitMq(brokers::rabbitmq::RabbitConfig),
}

impl Transport {
    /// The transport of `--broker`, if one is given.
    pub fn of(config: &Config) -> Option<Self> {
        Some(match config.broker.as_ref()? {
            Broker::Kafka { bootstrap } => Self::Kafka(config.kafka(bootstrap)),
            Broker::RabbitMq { url } => Self::RabbitMq(config.rabbitmq(url)),
        })
    }

    /// The transport of `--broker`, which `role` needs.
    pub fn required(config: &Config, role: &str) -> Result<Self> {
        Self::of(config).with_context(|| {
            format!("`{role}` needs --broker (BROKER); without a broker `orders-center dev` runs it over PostgreSQL")
        })
    }

    /// Creates the topics, or `consumer`'s queues with their bindings, so
    /// that messages published from now on wait for it.
    pub async fn prepare(&self, consumer: &str, streams: &[Stream]) -> Result<()> {
        match self {
            Self::Kafka(kafka) => {
                let mut topics = aggregate_types();
                topics.extend(streams.iter().map(|s| s.aggregate_type.as_str()));
                topics.sort_unstable();
                topics.dedup();
                kafka
                    .ensure_topics(&topics)
                    .await
                    .context("creating the Kafka topics")?
            }
            Self::RabbitMq(rabbit) => {
                for stream in streams {
                    brokers::rabbitmq::declare(rabbit, consumer, &rabbit_subscription(stream, 0))
                        .await
                        .with_context(|| format!("declaring {consumer}'s RabbitMQ queue"))?;
                }
            }
        }
        Ok(())
    }

    /// Feeds `consumer` from `streams` (prepared) until `shutdown`. On
    /// Kafka, `members` consumers of one group share the partitions, each
    /// applying its own batches, so one key's messages stay in order while
    /// partitions go in parallel; RabbitMQ keeps one active consumer per
    /// queue, and `members` does not apply.
    pub async fn run<C: Consumer + ?Sized>(
        &self,
        consumer: &C,
        streams: &[Stream],
        feed: Feed,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let batch = feed.batch;
        match self {
            Self::Kafka(kafka) => {
                let subscription = KafkaSubscription {
                    topics: streams
                        .iter()
                        .map(|s| kafka.topic(&s.aggregate_type))
                        .collect(),
                    group: format!("{}{}", kafka.topic_prefix, consumer.consumer()),
                    batch: usize::from(batch),
                };
                let members = (0..feed.members.max(1)).map(|_| {
                    brokers::kafka::consume(kafka, &subscription, consumer, shutdown.clone())
                });
                futures::future::try_join_all(members).await?;
            }
            Self::RabbitMq(rabbit) => {
                let queues = streams.iter().map(|stream| {
                    let subscription = rabbit_subscription(stream, batch);
                    let shutdown = shutdown.clone();
                    async move {
                        brokers::rabbitmq::consume(rabbit, &subscription, consumer, shutdown).await
                    }
                });
                futures::future::try_join_all(queues).await?;
            }
        }
        Ok(())
    }
}

/// How a consumer takes its messages.
#[derive(Debug, Clone, Copy)]
pub struct Feed {
    /// Most messages applied in one inbox transaction.
    pub batch: u16,
    /// Kafka consumers of the group in this process.
    pub members: usize,
}

impl Feed {
    /// `batch` messages a transaction, one member.
    pub fn batch(batch: u16) -> Self {
        Self { batch, members: 1 }
    }
}

fn rabbit_subscription(stream: &Stream, prefetch: u16) -> RabbitSubscription {
    RabbitSubscription {
        aggregate_type: stream.aggregate_type.clone(),
        events: stream.events.clone(),
        prefetch,
    }
}

/// Runs the journal over `transport` (prepared) until `shutdown`.
pub async fn run_journal(
    transport: Transport,
    store: store::Store,
    batch: u16,
    shutdown: CancellationToken,
) -> Result<()> {
    transport
        .run(
            &journal_inbox(&store),
            &Stream::orders(),
            Feed::batch(batch),
            shutdown,
        )
        .await
}

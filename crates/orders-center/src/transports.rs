//! What serves each routed destination, and the consumers: the sinks the
//! relay delivers through, picked by destination name, and the journal
//! consumer over the configured broker.

use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use brokers::kafka::{KafkaSink, KafkaSubscription};
use brokers::rabbitmq::{RabbitSink, RabbitSubscription};
use brokers::Broker;
use domain::{DeliveryPolicy, OrderEvent, ORDER_AGGREGATE};
use inbox::journal::Journal;
use inbox::local::LocalSink;
use inbox::{ConsumerMetrics, Inbox};
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

/// An outlet for every destination `config`'s routes name; 1C through
/// `onec`. A destination without a sink is a configuration error, not rows
/// that nobody would ever deliver.
pub async fn outlets(
    config: &Config,
    tuning: &RelayTuning,
    store: &store::Store,
    onec: impl FnOnce() -> Result<onec::HttpOnecClient>,
) -> Result<Vec<relay::Outlet>> {
    let mut onec = Some(onec);
    let mut outlets = Vec::new();
    for destination in config.routes().all_destinations() {
        let sink: Arc<dyn sink::Sink> = match (destination.as_str(), &config.broker) {
            (domain::ONEC, _) => {
                let client = onec.take().expect("one 1C destination")()?;
                outlets.push(tuning.onec_outlet(client));
                continue;
            }
            ("kafka", Some(Broker::Kafka { bootstrap })) => {
                let kafka = config.kafka(bootstrap);
                // The relay may start before the broker; the sink then
                // fails and retries like any delivery.
                if let Err(e) = kafka.ensure_topics(&[ORDER_AGGREGATE]).await {
                    tracing::warn!(error = %e, "could not create the Kafka topics yet");
                }
                Arc::new(KafkaSink::new(kafka)?)
            }
            ("rabbitmq", Some(Broker::RabbitMq { url })) => {
                Arc::new(RabbitSink::new(config.rabbitmq(url)))
            }
            (JOURNAL, _) => Arc::new(LocalSink::new(journal_inbox(store))),
            (other, _) => bail!(
                "events are routed to {other:?}, which has no sink here: route to onec, \
                 journal, or the destination of --broker (kafka or rabbitmq)"
            ),
        };
        outlets.push(relay::Outlet {
            destination,
            policy: DeliveryPolicy::EveryMessageInOrder,
            sink,
            protection: tuning.broker_protection(),
        });
    }
    Ok(outlets)
}

fn journal_inbox(store: &store::Store) -> Inbox<Journal> {
    Inbox::new(
        store.pool().clone(),
        JOURNAL,
        Journal::new(JOURNAL),
        consumer_metrics(),
    )
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

    /// Creates the journal's topics, or its queue with bindings, so that
    /// events published from now on wait for it.
    pub async fn prepare_journal(&self) -> Result<()> {
        match self {
            Self::Kafka(kafka) => kafka
                .ensure_topics(&[ORDER_AGGREGATE])
                .await
                .context("creating the Kafka topics")?,
            Self::RabbitMq(rabbit) => {
                brokers::rabbitmq::declare(rabbit, JOURNAL, &rabbit_journal(0))
                    .await
                    .context("declaring the journal's RabbitMQ queue")?
            }
        }
        Ok(())
    }
}

fn rabbit_journal(prefetch: u16) -> RabbitSubscription {
    RabbitSubscription {
        aggregate_type: ORDER_AGGREGATE.into(),
        events: OrderEvent::ALL.map(|e| e.as_str().to_owned()).to_vec(),
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
    let inbox = journal_inbox(&store);
    match transport {
        Transport::Kafka(kafka) => {
            let subscription = KafkaSubscription {
                topics: vec![kafka.topic(ORDER_AGGREGATE)],
                group: format!("{}{JOURNAL}", kafka.topic_prefix),
                batch: usize::from(batch),
            };
            brokers::kafka::consume(&kafka, &subscription, &inbox, shutdown).await?;
        }
        Transport::RabbitMq(rabbit) => {
            brokers::rabbitmq::consume(&rabbit, &rabbit_journal(batch), &inbox, shutdown).await?;
        }
    }
    Ok(())
}

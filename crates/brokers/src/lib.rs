//! Kafka and RabbitMQ as transports of orders-center. For each broker there
//! is an outbox [`Sink`](sink::Sink), which counts a message as delivered
//! only once the broker has acknowledged it, and a consumer loop that feeds
//! an [`inbox::Inbox`] and acknowledges only after its commit:
//!
//! - [`kafka`]: topic = prefix + aggregate type, key = aggregate id (one
//!   order's events stay in one partition, in order), idempotent producer
//!   with `acks=all`; poison goes to `<topic>.dead`;
//! - [`rabbitmq`]: a durable topic exchange per aggregate type, routing key
//!   = event name, publisher confirms; poison goes through the queue's
//!   dead-letter exchange to `<queue>.dead`.
//!
//! Every message carries the same metadata under the names in [`headers`].

pub mod kafka;
pub mod rabbitmq;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Names of the message headers both brokers carry.
pub mod headers {
    /// The event id: the consumer's inbox key.
    pub const EVENT_ID: &str = "event-id";
    /// The event, e.g. `order.updated`.
    pub const TYPE: &str = "type";
    /// The aggregate's version.
    pub const VERSION: &str = "version";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// The message's signature (`sink::signing`), on a stream with a key.
    pub const SIGNATURE: &str = sink::signing::HEADER;
    /// On a dead letter: the poison class, e.g. `bad_json`.
    pub const DEAD_CLASS: &str = "dead-class";
    /// On a dead letter: why it can never be applied.
    pub const DEAD_REASON: &str = "dead-reason";
    /// On a dead letter: the consumer that refused it.
    pub const DEAD_CONSUMER: &str = "dead-consumer";
    /// On a dead letter: where it was read, e.g. `order/3@1041`.
    pub const DEAD_ORIGIN: &str = "dead-origin";
}

/// A broker, as `--broker` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// `kafka://host:port[,host:port…]`.
    Kafka {
        /// librdkafka's `bootstrap.servers`.
        bootstrap: String,
    },
    /// `amqp://user:password@host:port/vhost` (or `amqps://`).
    RabbitMq {
        /// The AMQP URI, as given.
        url: String,
    },
}

impl Broker {
    /// The outbox destination of this broker's messages: `kafka` or
    /// `rabbitmq`.
    pub fn destination(&self) -> &'static str {
        match self {
            Self::Kafka { .. } => "kafka",
            Self::RabbitMq { .. } => "rabbitmq",
        }
    }
}

impl FromStr for Broker {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(servers) = s.strip_prefix("kafka://") {
            let bootstrap = servers.trim_end_matches('/').to_owned();
            if bootstrap.is_empty() {
                return Err("kafka:// needs host:port".into());
            }
            Ok(Self::Kafka { bootstrap })
        } else if s.starts_with("amqp://") || s.starts_with("amqps://") {
            Ok(Self::RabbitMq { url: s.to_owned() })
        } else {
            Err(format!(
                "{s:?} is not a broker: use kafka://host:port or amqp://user:password@host:port/vhost"
            ))
        }
    }
}

impl fmt::Display for Broker {
    /// The URL without its password, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kafka { bootstrap } => write!(f, "kafka://{bootstrap}"),
            Self::RabbitMq { url } => match url.split_once('@') {
                Some((userinfo, rest)) => {
                    let scheme_end = userinfo.find("://").map_or(0, |i| i + 3);
                    let user = userinfo[scheme_end..].split(':').next().unwrap_or("");
                    write!(f, "{}{user}:***@{rest}", &userinfo[..scheme_end])
                }
                None => f.write_str(url),
            },
        }
    }
}

/// Errors of a broker transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka refused or failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// RabbitMQ refused or failed.
    #[error("rabbitmq: {0}")]
    RabbitMq(#[from] lapin::Error),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// A dead letter was not confirmed.
    #[error("dead letter for {queue} not confirmed by the broker")]
    DeadLetter {
        /// The queue whose message it was.
        queue: String,
    },
    /// A topic could not be created.
    #[error("kafka topic {topic}: {detail}")]
    Topic {
        /// The topic.
        topic: String,
        /// Why.
        detail: String,
    },
    /// A thread could not be started.
    #[error("thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Waits `delay` unless `cancel` fires first; says whether to go on.
async fn pause(delay: Duration, cancel: &tokio_util::sync::CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// How long a consumer waits before retrying a batch its database refused.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Applies a batch, retrying while the database is away; `None` when
/// cancelled first.
pub(crate) async fn apply<C: inbox::Consumer + ?Sized>(
    inbox: &C,
    batch: &[inbox::Incoming],
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<Vec<inbox::Verdict>> {
    loop {
        match inbox.process(batch).await {
            Ok(verdicts) => return Some(verdicts),
            Err(e) => {
                tracing::warn!(consumer = inbox.consumer(), error = %e, "batch not applied; retrying");
                if !pause(RETRY_DELAY, cancel).await {
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_and_print_without_passwords() {
        let k: Broker = "kafka://127.0.0.1:9092,127.0.0.1:9093".parse().unwrap();
        assert_eq!(
            k,
            Broker::Kafka {
                bootstrap: "127.0.0.1:9092,127.0.0.1:9093".into()
            }
        );
        assert_eq!(k.destination(), "kafka");
        let r: Broker = "amqp://orders:s3cret@mq:5672/%2f".parse().unwrap();
        assert_eq!(r.destination(), "rabbitmq");
        assert_eq!(r.to_string(), "amqp://orders:***@mq:5672/%2f");
        assert!(!r.to_string().contains("s3cret"));
        assert!("redis://x".parse::<Broker>().is_err());
        assert!("kafka://".parse::<Broker>().is_err());
    }
}

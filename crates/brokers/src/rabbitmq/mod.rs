//! RabbitMQ: the outbox sink ([`RabbitSink`]) and the inbox consumer
//! ([`consume`]).
//!
//! Topology, declared by whichever side comes first (every declaration is
//! idempotent):
//! - a durable topic exchange `<prefix><aggregate type>`, e.g. `order`; the
//!   routing key is the event name, e.g. `order.updated`;
//! - per consumer, a quorum queue bound to the events it handles, with a
//!   single active consumer (so one order's events are applied in order even
//!   with several replicas), a delivery limit and the dead-letter exchange
//!   below;
//! - a durable direct exchange `<prefix>dead-letter`, and per queue a
//!   durable `<queue>.dead` bound to it with the queue's name.
//!
//! The delivery limit is what gets a message lapin cannot parse (a
//! `message_id` or a header name that is not UTF-8, which other teams'
//! producers can send) out of the way: lapin drops the connection at that
//! frame, the broker takes the message back and counts a delivery, and past
//! [`RabbitConfig::delivery_limit`] dead-letters it with the reason
//! `delivery_limit` (in its `x-death` header). A client-side fix would need
//! a fork of lapin's frame parser; the broker-side limit also covers any
//! other message that kills a consumer before it can say why. Classic
//! queues have no delivery limit, so the queues are quorum queues. A queue
//! declared classic by an older release must be deleted (after draining)
//! before this one declares it again.
//!
//! Seed 004 has a queue per event and consumer. A consumer that needs one
//! order's events in order across event types (the journal, the saga) binds
//! them to one queue instead: two queues are read in no particular order.

mod consumer;
mod sink;

use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub use consumer::{consume, RabbitSubscription};
pub use sink::RabbitSink;

use crate::Error;

/// How to reach RabbitMQ and name exchanges and queues.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    /// The AMQP URI.
    pub url: String,
    /// Put before every exchange and queue name.
    pub prefix: String,
    /// How long a publish may wait for the broker's confirm before it
    /// counts as failed and the connection is dropped: a frozen broker
    /// keeps the socket open and never answers.
    pub confirm_timeout: std::time::Duration,
    /// Deliveries of one message before the broker dead-letters it
    /// (`x-delivery-limit`). A message is counted again each time a
    /// connection drops while it is unacknowledged: a poison every time, a
    /// good message only when it is in flight at a fault.
    pub delivery_limit: u32,
}

impl RabbitConfig {
    /// Defaults for `url`.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: String::new(),
            confirm_timeout: std::time::Duration::from_secs(10),
            delivery_limit: 5,
        }
    }

    /// The exchange of `aggregate_type`'s events.
    pub fn exchange(&self, aggregate_type: &str) -> String {
        format!("{}{aggregate_type}", self.prefix)
    }

    /// The exchange every queue dead-letters to.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}dead-letter", self.prefix)
    }

    /// The queue of `consumer` for `aggregate_type`, e.g. `journal.order`.
    pub fn queue(&self, consumer: &str, aggregate_type: &str) -> String {
        format!("{}{consumer}.{aggregate_type}", self.prefix)
    }

    async fn connect(&self) -> Result<Connection, Error> {
        Ok(Connection::connect(&self.url, ConnectionProperties::default()).await?)
    }

    /// A new connection and a channel on it in publisher-confirm mode. The
    /// channel closes when the connection is dropped.
    pub async fn confirmed_channel(&self) -> Result<(Connection, Channel), Error> {
        let connection = self.connect().await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((connection, channel))
    }
}

/// Declares the queue of `consumer` for `subscription`, with its bindings
/// and dead-letter queue, so that messages published before the consumer
/// first runs are kept rather than returned.
pub async fn declare(
    config: &RabbitConfig,
    consumer: &str,
    subscription: &RabbitSubscription,
) -> Result<(), Error> {
    let connection = config.connect().await?;
    let channel = connection.create_channel().await?;
    let exchange = config.exchange(&subscription.aggregate_type);
    let queue = config.queue(consumer, &subscription.aggregate_type);
    declare_queue(&channel, config, &exchange, &queue, &subscription.events).await?;
    connection.close(200, "declared".into()).await?;
    Ok(())
}

/// Where the messages `queue` can never apply end up.
pub fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> Result<(), Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name.into(), kind, durable, FieldTable::default())
        .await?;
    Ok(())
}

/// Declares `queue`, bound to `exchange` for `routing_keys`, with its
/// dead-letter queue.
async fn declare_queue(
    channel: &Channel,
    config: &RabbitConfig,
    exchange: &str,
    queue: &str,
    routing_keys: &[String],
) -> Result<(), Error> {
    let dlx = config.dead_letter_exchange();
    declare_exchange(channel, exchange, ExchangeKind::Topic).await?;
    declare_exchange(channel, &dlx, ExchangeKind::Direct).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dead = dead_queue(queue);
    channel
        .queue_declare(dead.as_str().into(), durable, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert(ShortString::from("x-dead-letter-exchange"), text(&dlx));
    args.insert(ShortString::from("x-dead-letter-routing-key"), text(queue));
    args.insert(
        ShortString::from("x-single-active-consumer"),
        AMQPValue::Boolean(true),
    );
    args.insert(ShortString::from("x-queue-type"), text("quorum"));
    args.insert(
        ShortString::from("x-delivery-limit"),
        AMQPValue::LongLongInt(i64::from(config.delivery_limit)),
    );
    channel.queue_declare(queue.into(), durable, args).await?;
    for key in routing_keys {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

//! The inbox consumer over RabbitMQ.

use std::time::Duration;

use futures::StreamExt;
use inbox::{Consumer, Incoming, Poison, Verdict};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

use super::{declare_queue, RabbitConfig};
use crate::{apply, headers, pause, Error};

/// What one consumer reads.
#[derive(Debug, Clone)]
pub struct RabbitSubscription {
    /// The exchange's aggregate type, e.g. `order`.
    pub aggregate_type: String,
    /// The events (routing keys) bound to the consumer's queue.
    pub events: Vec<String>,
    /// The most messages applied in one inbox transaction. The broker may
    /// push twice as many unacknowledged, so the next batch is already here
    /// while one commits.
    pub prefetch: u16,
}

/// How often the queue depth is read for the lag gauge.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// Runs `inbox` over the consumer's queue until `cancel`, reconnecting
/// after the broker goes away. A batch is acknowledged only after its inbox
/// transaction commits and its poison is confirmed in `<queue>.dead`.
pub async fn consume<C: Consumer + ?Sized>(
    config: &RabbitConfig,
    subscription: &RabbitSubscription,
    inbox: &C,
    cancel: CancellationToken,
) -> Result<(), Error> {
    loop {
        match session(config, subscription, inbox, &cancel).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(consumer = inbox.consumer(), error = %e, "rabbitmq session ended; reconnecting");
                if !pause(Duration::from_secs(1), &cancel).await {
                    return Ok(());
                }
            }
        }
    }
}

async fn session<C: Consumer + ?Sized>(
    config: &RabbitConfig,
    subscription: &RabbitSubscription,
    inbox: &C,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    let (connection, channel) = config.confirmed_channel().await?;
    let exchange = config.exchange(&subscription.aggregate_type);
    let queue = config.queue(inbox.consumer(), &subscription.aggregate_type);
    declare_queue(&channel, config, &exchange, &queue, &subscription.events).await?;
    let prefetch = subscription.prefetch.max(1);
    channel
        .basic_qos(prefetch.saturating_mul(2), BasicQosOptions::default())
        .await?;
    let deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            inbox.consumer().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(consumer = inbox.consumer(), queue, "consuming");
    let mut batches = deliveries.ready_chunks(usize::from(prefetch));
    let mut lag = tokio::time::interval(LAG_EVERY);
    loop {
        let batch = tokio::select! {
            () = cancel.cancelled() => {
                let _ = connection.close(200, "shutdown".into()).await;
                return Ok(());
            }
            _ = lag.tick() => {
                let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                let q = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await?;
                inbox.metrics().set_lag(inbox.consumer(), &queue, i64::from(q.message_count()));
                continue;
            }
            batch = batches.next() => batch.ok_or(Error::Closed)?,
        };
        let deliveries: Vec<Delivery> = batch.into_iter().collect::<Result<_, _>>()?;
        let incoming: Vec<Incoming> = deliveries.iter().map(incoming).collect();
        let Some(verdicts) = apply(inbox, &incoming, cancel).await else {
            return Ok(());
        };
        for ((d, i), v) in deliveries.iter().zip(&incoming).zip(&verdicts) {
            if let Verdict::Dead(poison) = v {
                bury(
                    &channel,
                    config,
                    &queue,
                    d,
                    inbox.consumer(),
                    &i.origin,
                    poison,
                )
                .await?;
            }
        }
        if let Some(last) = deliveries.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
}

fn incoming(d: &Delivery) -> Incoming {
    Incoming {
        id: d.properties.message_id().as_ref().map(|s| s.to_string()),
        payload: d.data.clone(),
        origin: format!("{}:{}", d.exchange, d.routing_key),
    }
}

/// Publishes `d` to the dead-letter exchange under its queue's name, with
/// the reason, and waits for the broker's confirm.
async fn bury(
    channel: &Channel,
    config: &RabbitConfig,
    queue: &str,
    d: &Delivery,
    consumer: &str,
    origin: &str,
    poison: &Poison,
) -> Result<(), Error> {
    tracing::warn!(consumer, origin, %poison, "dead-lettering a message");
    let mut table = d.properties.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    table.insert(ShortString::from(headers::DEAD_CLASS), text(poison.class));
    table.insert(
        ShortString::from(headers::DEAD_REASON),
        text(&poison.reason),
    );
    table.insert(ShortString::from(headers::DEAD_CONSUMER), text(consumer));
    table.insert(ShortString::from(headers::DEAD_ORIGIN), text(origin));
    let properties: BasicProperties = d.properties.clone().with_headers(table);
    let confirm = channel
        .basic_publish(
            config.dead_letter_exchange().as_str().into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &d.data,
            properties,
        )
        .await?
        .await?;
    if confirm.is_ack() && confirm.take_message().is_none() {
        Ok(())
    } else {
        Err(Error::DeadLetter {
            queue: queue.to_owned(),
        })
    }
}

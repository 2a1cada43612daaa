//! The inbox consumer over RabbitMQ.

use std::time::Duration;

use futures::StreamExt;
use inbox::{Consumer, Incoming, Poison, Verdict};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
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
///
/// After a session fails, the next one starts careful: one unacknowledged
/// message at a time until it has applied one that was not redelivered.
/// When lapin cannot parse a message it drops the connection, and the
/// broker counts a delivery against every message then unacknowledged and
/// hands them out again before any other. Read one at a time, only the
/// poison is counted again, so it reaches the queue's delivery limit and is
/// dead-lettered while the messages behind it are not.
pub async fn consume<C: Consumer + ?Sized>(
    config: &RabbitConfig,
    subscription: &RabbitSubscription,
    inbox: &C,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let mut careful = false;
    loop {
        match session(config, subscription, inbox, &cancel, careful).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(consumer = inbox.consumer(), error = %e, "rabbitmq session ended; reconnecting, one message at a time until one is applied");
                careful = true;
                if !pause(Duration::from_secs(1), &cancel).await {
                    return Ok(());
                }
            }
        }
    }
}

/// How a run of one `basic.consume` ended.
enum Ended {
    /// Cancelled: stop.
    Shutdown,
    /// A careful consumer got past the redelivered messages and was
    /// cancelled, with every delivery it had applied and acknowledged:
    /// consume at full prefetch now.
    Settled,
}

async fn session<C: Consumer + ?Sized>(
    config: &RabbitConfig,
    subscription: &RabbitSubscription,
    inbox: &C,
    cancel: &CancellationToken,
    mut careful: bool,
) -> Result<(), Error> {
    let (connection, channel) = config.confirmed_channel().await?;
    let exchange = config.exchange(&subscription.aggregate_type);
    let queue = config.queue(inbox.consumer(), &subscription.aggregate_type);
    declare_queue(&channel, config, &exchange, &queue, &subscription.events).await?;
    let prefetch = subscription.prefetch.max(1);
    loop {
        // A prefetch applies to the consumers started after it.
        let window = if careful {
            1
        } else {
            prefetch.saturating_mul(2)
        };
        channel
            .basic_qos(window, BasicQosOptions::default())
            .await?;
        let deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                inbox.consumer().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(consumer = inbox.consumer(), queue, careful, "consuming");
        let run = Run {
            config,
            channel: &channel,
            queue: &queue,
            inbox,
            cancel,
        };
        match run.until_done(deliveries, prefetch, careful).await? {
            Ended::Shutdown => {
                let _ = connection.close(200, "shutdown".into()).await;
                return Ok(());
            }
            Ended::Settled => careful = false,
        }
    }
}

/// One `basic.consume` on a session's channel.
struct Run<'a, C: ?Sized> {
    config: &'a RabbitConfig,
    channel: &'a Channel,
    queue: &'a str,
    inbox: &'a C,
    cancel: &'a CancellationToken,
}

impl<C: Consumer + ?Sized> Run<'_, C> {
    async fn until_done(
        &self,
        deliveries: lapin::Consumer,
        prefetch: u16,
        careful: bool,
    ) -> Result<Ended, Error> {
        let mut batches = deliveries.ready_chunks(usize::from(prefetch));
        let mut lag = tokio::time::interval(LAG_EVERY);
        let mut cancelling = false;
        loop {
            let batch = tokio::select! {
                () = self.cancel.cancelled() => return Ok(Ended::Shutdown),
                _ = lag.tick() => {
                    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                    let q = self.channel.queue_declare(self.queue.into(), passive, FieldTable::default()).await?;
                    self.inbox.metrics().set_lag(self.inbox.consumer(), self.queue, i64::from(q.message_count()));
                    continue;
                }
                batch = batches.next() => match batch {
                    Some(batch) => batch,
                    // The stream of a cancelled consumer ends after the
                    // deliveries sent before the broker's cancel-ok.
                    None if cancelling => return Ok(Ended::Settled),
                    None => return Err(Error::Closed),
                },
            };
            let deliveries: Vec<Delivery> = batch.into_iter().collect::<Result<_, _>>()?;
            if !self.apply(&deliveries).await? {
                return Ok(Ended::Shutdown);
            }
            // Messages the broker took back come first, marked redelivered;
            // the poison is one of them. A fresh one means they are behind.
            if careful && !cancelling && deliveries.iter().any(|d| !d.redelivered) {
                self.channel
                    .basic_cancel(self.inbox.consumer().into(), BasicCancelOptions::default())
                    .await?;
                cancelling = true;
            }
        }
    }

    /// Applies a batch, buries its poison and acknowledges it; `false` when
    /// cancelled first.
    async fn apply(&self, deliveries: &[Delivery]) -> Result<bool, Error> {
        let incoming: Vec<Incoming> = deliveries.iter().map(incoming).collect();
        let Some(verdicts) = apply(self.inbox, &incoming, self.cancel).await else {
            return Ok(false);
        };
        for ((d, i), v) in deliveries.iter().zip(&incoming).zip(&verdicts) {
            if let Verdict::Dead(poison) = v {
                bury(
                    self.channel,
                    self.config,
                    self.queue,
                    d,
                    self.inbox.consumer(),
                    &i.origin,
                    poison,
                )
                .await?;
            }
        }
        if let Some(last) = deliveries.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(true)
    }
}

fn incoming(d: &Delivery) -> Incoming {
    Incoming {
        id: d.properties.message_id().as_ref().map(|s| s.to_string()),
        payload: d.data.clone(),
        origin: format!("{}:{}", d.exchange, d.routing_key),
        signature: d
            .properties
            .headers()
            .as_ref()
            .and_then(|t| match t.inner().get(headers::SIGNATURE) {
                Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
                _ => None,
            })
            .map(str::to_owned),
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

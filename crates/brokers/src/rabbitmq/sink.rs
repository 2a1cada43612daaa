//! The outbox sink to RabbitMQ.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use sink::{Failure, FailureKind, Message, Outcome, Sink};
use tokio::sync::Mutex;

use super::{declare_exchange, RabbitConfig};
use crate::headers;

/// How long connecting may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon after a failed connect the next is tried.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Publishes outbox messages, persistent and mandatory, to the exchange of
/// their aggregate type with the event name as routing key. A message
/// counts as delivered only when the broker confirms it; a nack or a return
/// (no queue bound) is a failure. Reconnects after the connection drops.
pub struct RabbitSink {
    config: RabbitConfig,
    link: Mutex<State>,
}

#[derive(Default)]
struct State {
    link: Option<Link>,
    /// When connecting last failed: callers queued behind a failed attempt
    /// fail at once instead of each waiting out its own timeout.
    failed_at: Option<Instant>,
}

struct Link {
    // Dropping the connection closes the channel.
    _connection: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

impl RabbitSink {
    /// A sink for `config`; connects on first use.
    pub fn new(config: RabbitConfig) -> Self {
        Self {
            config,
            link: Mutex::new(State::default()),
        }
    }

    /// A connected channel in confirm mode on which `exchange` exists.
    async fn channel(&self, exchange: &str) -> Result<Channel, Failure> {
        let mut state = self.link.lock().await;
        if state
            .link
            .as_ref()
            .is_some_and(|l| !l.channel.status().connected())
        {
            state.link = None;
        }
        if state.link.is_none() {
            if state
                .failed_at
                .is_some_and(|at| at.elapsed() < RECONNECT_AFTER)
            {
                return Err(unreachable_broker("not connected; retrying shortly"));
            }
            let connect = async {
                let (connection, channel) = self.config.confirmed_channel().await?;
                Ok::<_, crate::Error>(Link {
                    _connection: connection,
                    channel,
                    declared: HashSet::new(),
                })
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(link)) => state.link = Some(link),
                failed => {
                    state.failed_at = Some(Instant::now());
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".to_owned(),
                    };
                    return Err(unreachable_broker(&why));
                }
            }
        }
        let l = state.link.as_mut().expect("connected above");
        if !l.declared.contains(exchange) {
            declare_exchange(&l.channel, exchange, ExchangeKind::Topic)
                .await
                .map_err(|e| unreachable_broker(&e.to_string()))?;
            l.declared.insert(exchange.to_owned());
        }
        Ok(l.channel.clone())
    }

    /// Publishes and waits for the confirm.
    async fn publish(&self, channel: &Channel, exchange: &str, m: &Message) -> Outcome {
        let confirm = self.send(channel, exchange, m).await?;
        settle(exchange, confirm.await)
    }

    /// Publishes, and returns the confirm to wait for.
    async fn send(
        &self,
        channel: &Channel,
        exchange: &str,
        m: &Message,
    ) -> Result<lapin::PublisherConfirm, Failure> {
        let mut table = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        table.insert(ShortString::from(headers::TYPE), text(&m.kind));
        table.insert(
            ShortString::from(headers::VERSION),
            AMQPValue::LongLongInt(m.version),
        );
        table.insert(ShortString::from("aggregate-id"), text(&m.aggregate_id));
        if let Some(tp) = &m.traceparent {
            table.insert(ShortString::from(headers::TRACEPARENT), text(tp));
        }
        if let Some(signature) = &m.signature {
            table.insert(ShortString::from(headers::SIGNATURE), text(signature));
        }
        let properties = BasicProperties::default()
            .with_message_id(m.event_id.to_string().into())
            .with_type(m.kind.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(table);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        channel
            .basic_publish(
                exchange.into(),
                m.kind.as_str().into(),
                options,
                m.payload.get().as_bytes(),
                properties,
            )
            .await
            .map_err(|e| unreachable_broker(&e.to_string()))
    }

    /// Publishes every message, then awaits the confirms, all within
    /// one confirm timeout.
    async fn publish_batch(&self, messages: &[Message]) -> Vec<Outcome> {
        let mut sent = Vec::with_capacity(messages.len());
        let mut failed = None;
        for m in messages {
            let exchange = self.config.exchange(&m.aggregate_type);
            let confirm = match self.channel(&exchange).await {
                Ok(channel) => self.send(&channel, &exchange, m).await,
                Err(f) => Err(f),
            };
            match confirm {
                Ok(confirm) => sent.push((exchange, confirm)),
                Err(f) => {
                    failed = Some(f);
                    break;
                }
            }
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        for (exchange, confirm) in sent {
            outcomes.push(settle(&exchange, confirm.await));
        }
        outcomes.extend(failed.map(Err));
        outcomes.resize_with(messages.len(), || Err(Failure::not_sent()));
        outcomes
    }

    /// After no confirm came in time: the next attempt starts on a fresh
    /// connection.
    async fn timed_out(&self) -> Failure {
        self.link.lock().await.link = None;
        Failure {
            kind: FailureKind::Transient,
            class: "timeout",
            counts_against_destination: true,
            retry_after: None,
            detail: format!(
                "rabbitmq did not confirm within {:?}",
                self.config.confirm_timeout
            ),
        }
    }
}

/// What a publish's confirm came to.
fn settle(exchange: &str, confirmed: Result<Confirmation, lapin::Error>) -> Outcome {
    match confirmed {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => Err(Failure {
            // No queue is bound for this event yet; a consumer declared
            // later will be, so retry, but say nothing of the broker.
            kind: FailureKind::Transient,
            class: "unroutable",
            counts_against_destination: false,
            retry_after: None,
            detail: format!(
                "rabbitmq returned the message from {exchange} ({} {})",
                returned.reply_code, returned.reply_text
            ),
        }),
        Ok(Confirmation::Nack(_)) => Err(Failure {
            kind: FailureKind::Transient,
            class: "nacked",
            counts_against_destination: true,
            retry_after: None,
            detail: format!("rabbitmq nacked the message on {exchange}"),
        }),
        Ok(Confirmation::NotRequested) => Err(Failure {
            kind: FailureKind::Transient,
            class: "unconfirmed",
            counts_against_destination: true,
            retry_after: None,
            detail: "rabbitmq channel is not in confirm mode".into(),
        }),
        // The connection dropped before the confirm: a copy may be in
        // the queue already, which the consumer's inbox absorbs.
        Err(e) => Err(unreachable_broker(&e.to_string())),
    }
}

fn unreachable_broker(detail: &str) -> Failure {
    Failure {
        kind: FailureKind::Transient,
        class: "connection",
        counts_against_destination: true,
        retry_after: None,
        detail: format!("rabbitmq: {detail}"),
    }
}

#[async_trait::async_trait]
impl Sink for RabbitSink {
    async fn deliver(&self, m: &Message) -> Outcome {
        let exchange = self.config.exchange(&m.aggregate_type);
        let channel = self.channel(&exchange).await?;
        // A frozen broker keeps the socket open and never answers: both the
        // write and the confirm can hang, so the bound covers both.
        match tokio::time::timeout(
            self.config.confirm_timeout,
            self.publish(&channel, &exchange, m),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(self.timed_out().await),
        }
    }

    /// Publishes the whole batch, then awaits the confirms in bulk.
    async fn deliver_batch(&self, messages: &[Message]) -> Vec<Outcome> {
        match tokio::time::timeout(self.config.confirm_timeout, self.publish_batch(messages)).await
        {
            Ok(outcomes) => outcomes,
            Err(_) => {
                let failure = self.timed_out().await;
                vec![Err(failure); messages.len()]
            }
        }
    }
}

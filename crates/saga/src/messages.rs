//! The saga's wire contract. Every message is one flat JSON object, the
//! same on Kafka, RabbitMQ and the PostgreSQL transport:
//!
//! ```json
//! {"type": "ChargePayment", "order_id": "ORD-1", "account_id": "acc-7", "amount": 150.5}
//! ```
//!
//! `type` is the event name (RabbitMQ's routing key, seed 004); the topic
//! (Kafka topic, outbox aggregate type) is fixed per type, see [`Topic`].
//! Its message id (Kafka's `event-id` header, AMQP's `message_id`) is the
//! outbox event id, which the receiving inbox deduplicates on.

use std::fmt;
use std::str::FromStr;

pub use domain::checkout::{check_name, line_problems, Checkout, Line, MAX_LINES, MAX_QUANTITY};
use domain::Money;
use serde::{Deserialize, Serialize};

/// The longest `reason` a message may carry, in bytes: ours are a line;
/// the notifier keeps every one it is given.
pub const MAX_REASON: usize = 1024;

/// What a message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// orders-center → inventory: reserve every line, or none; then (the
    /// `account_id` and `amount` it carries) payments charges the order.
    ReserveStock,
    /// orders-center → inventory: give the order's reservation back.
    ReleaseStock,
    /// orders-center → inventory: the order is paid; the reserved stock is
    /// sold. Sagas started before `OrderCompleted` sold it.
    CommitStock,
    /// orders-center → payments: take `amount` from `account_id`. Sagas
    /// started before the charge rode on `StockReserved`.
    ChargePayment,
    /// orders-center → payments: give the order's charge back.
    RefundPayment,
    /// inventory → orders-center and payments: every line is reserved;
    /// carries the `ReserveStock` it answers, endorsed by orders-center,
    /// which payments charges.
    StockReserved,
    /// inventory: nothing was reserved, with the `reason`.
    StockFailed,
    /// inventory: the reservation (if any) is released.
    StockReleased,
    /// inventory: the reservation is sold.
    StockCommitted,
    /// payments: `amount` was charged.
    PaymentSucceeded,
    /// payments: nothing was charged, with the `reason`.
    PaymentFailed,
    /// payments: `amount` (0 when nothing had been charged) was refunded.
    PaymentRefunded,
    /// orders-center → notifier and inventory: the order completed; its
    /// reserved stock is sold.
    OrderCompleted,
    /// orders-center → notifier: the order was cancelled, with the `reason`.
    OrderCancelled,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 14] = [
        Kind::ReserveStock,
        Kind::ReleaseStock,
        Kind::CommitStock,
        Kind::ChargePayment,
        Kind::RefundPayment,
        Kind::StockReserved,
        Kind::StockFailed,
        Kind::StockReleased,
        Kind::StockCommitted,
        Kind::PaymentSucceeded,
        Kind::PaymentFailed,
        Kind::PaymentRefunded,
        Kind::OrderCompleted,
        Kind::OrderCancelled,
    ];

    /// The event name: the outbox `type` and RabbitMQ's routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ReserveStock => "ReserveStock",
            Kind::ReleaseStock => "ReleaseStock",
            Kind::CommitStock => "CommitStock",
            Kind::ChargePayment => "ChargePayment",
            Kind::RefundPayment => "RefundPayment",
            Kind::StockReserved => "StockReserved",
            Kind::StockFailed => "StockFailed",
            Kind::StockReleased => "StockReleased",
            Kind::StockCommitted => "StockCommitted",
            Kind::PaymentSucceeded => "PaymentSucceeded",
            Kind::PaymentFailed => "PaymentFailed",
            Kind::PaymentRefunded => "PaymentRefunded",
            Kind::OrderCompleted => "OrderCompleted",
            Kind::OrderCancelled => "OrderCancelled",
        }
    }

    /// For an answer, the command it answers.
    pub fn answers(self) -> Option<Kind> {
        match self {
            Kind::StockReserved | Kind::StockFailed => Some(Kind::ReserveStock),
            Kind::StockReleased => Some(Kind::ReleaseStock),
            Kind::StockCommitted => Some(Kind::CommitStock),
            Kind::PaymentSucceeded | Kind::PaymentFailed => Some(Kind::ChargePayment),
            Kind::PaymentRefunded => Some(Kind::RefundPayment),
            _ => None,
        }
    }

    /// The consumers that read it, by name; on the PostgreSQL transport
    /// also the outbox destinations it is written for.
    pub fn readers(self) -> &'static [&'static str] {
        match self {
            Kind::StockReserved => &["saga", "payments"],
            Kind::OrderCompleted => &["notifier", "inventory"],
            other => match other.topic() {
                Topic::ReserveCommands => &["inventory"],
                Topic::PaymentCommands => &["payments"],
                Topic::Reserve | Topic::Payment => &["saga"],
                Topic::Saga => &["notifier"],
            },
        }
    }

    /// The topic it travels on.
    pub fn topic(self) -> Topic {
        match self {
            Kind::ReserveStock | Kind::ReleaseStock | Kind::CommitStock => Topic::ReserveCommands,
            Kind::ChargePayment | Kind::RefundPayment => Topic::PaymentCommands,
            Kind::StockReserved
            | Kind::StockFailed
            | Kind::StockReleased
            | Kind::StockCommitted => Topic::Reserve,
            Kind::PaymentSucceeded | Kind::PaymentFailed | Kind::PaymentRefunded => Topic::Payment,
            Kind::OrderCompleted | Kind::OrderCancelled => Topic::Saga,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a saga message"))
    }
}

/// The names of the saga's signing keys (`sink::signing`): one per
/// stream, and one per reader of the streams with two (`stream@reader`).
/// The chart generates one key for each.
pub const KEY_NAMES: [&str; 7] = [
    "reserve.commands",
    "payment.commands",
    "reserve@saga",
    "reserve@payments",
    "payment",
    "saga@notifier",
    "saga@inventory",
];

/// A stream of saga messages: a Kafka topic, the outbox aggregate type, and
/// the name part of a consumer's RabbitMQ queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Commands to inventory.
    ReserveCommands,
    /// Commands to payments.
    PaymentCommands,
    /// inventory's answers (seed 001's `reserve` topic).
    Reserve,
    /// payments' answers (seed 001's `payment` topic).
    Payment,
    /// The outcomes, for the notifier.
    Saga,
}

impl Topic {
    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::ReserveCommands => "reserve.commands",
            Topic::PaymentCommands => "payment.commands",
            Topic::Reserve => "reserve",
            Topic::Payment => "payment",
            Topic::Saga => "saga",
        }
    }

    /// Every topic.
    pub const ALL: [Topic; 5] = [
        Topic::ReserveCommands,
        Topic::PaymentCommands,
        Topic::Reserve,
        Topic::Payment,
        Topic::Saga,
    ];

    /// The kinds that travel on it.
    pub fn kinds(self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| k.topic() == self)
            .collect()
    }

    /// The kinds on it that `reader` reads.
    pub fn kinds_for(self, reader: &str) -> Vec<Kind> {
        self.kinds()
            .into_iter()
            .filter(|k| k.readers().contains(&reader))
            .collect()
    }
}

/// A command as it was sent, passed on inside an answer to the service
/// that acts next: `StockReserved` carries its `ReserveStock` to payments,
/// which charges what orders-center endorsed (the `e1=` items of the
/// command's signature, made with the key of `payment.commands`) and so
/// never what inventory alone says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    /// The command's message id.
    pub id: String,
    /// Its body, byte for byte.
    pub body: String,
    /// Its endorsement, when its stream is signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement: Option<String>,
}

/// One saga message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaMessage {
    /// What it says.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The order (the saga) it is about; the Kafka key.
    pub order_id: String,
    /// `ReserveStock`: the lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<Line>,
    /// `ReserveStock`, `ChargePayment`: who pays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// `ReserveStock`, `ChargePayment`, `PaymentSucceeded`,
    /// `PaymentRefunded`, `OrderCompleted`: how much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Money>,
    /// `StockFailed`, `PaymentFailed`, `OrderCancelled`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An answer: the message id of the command it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    /// `StockReserved`: the `ReserveStock` it answers, for payments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voucher: Option<Voucher>,
}

impl SagaMessage {
    /// A message of `kind` about `order_id` with no other field.
    pub fn new(kind: Kind, order_id: &str) -> Self {
        Self {
            kind,
            order_id: order_id.to_owned(),
            lines: Vec::new(),
            account_id: None,
            amount: None,
            reason: None,
            in_reply_to: None,
            voucher: None,
        }
    }

    /// Answering the command with message id `command`.
    pub fn replying_to(mut self, command: &str) -> Self {
        self.in_reply_to = Some(command.to_owned());
        self
    }

    /// With `reason`.
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// With `amount`.
    pub fn amount(mut self, amount: Money) -> Self {
        self.amount = Some(amount);
        self
    }

    /// Parses and checks a body, saying what is wrong: not JSON, or not a
    /// well-formed message of a known kind.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
        kind.parse::<Kind>().map_err(DecodeError::UnknownType)?;
        let message: SagaMessage = serde_json::from_value(value)
            .map_err(|e| DecodeError::Invalid(format!("not a saga message: {e}")))?;
        message.check().map_err(DecodeError::Invalid)?;
        Ok(message)
    }

    /// Whether the fields its kind needs are there and valid.
    pub fn check(&self) -> Result<(), String> {
        domain::OrderId::parse(&self.order_id).map_err(|m| format!("order_id {m}"))?;
        match self.kind {
            Kind::ReserveStock => {
                if self.lines.is_empty() {
                    return Err("lines must name at least one line".into());
                }
                if let Some((field, m)) = line_problems(&self.lines, "lines").into_iter().next() {
                    return Err(format!("{field} {m}"));
                }
                // The charge; older commands carry none.
                if self.account_id.is_some() || self.amount.is_some() {
                    self.charge()?;
                }
            }
            Kind::ChargePayment => {
                self.charge()?;
            }
            Kind::PaymentSucceeded | Kind::OrderCompleted => self.positive_amount()?,
            Kind::PaymentRefunded => {
                let amount = self.amount.ok_or("amount is missing")?;
                amount.check().map_err(|m| format!("amount {m}"))?;
            }
            // The charge it compensates, by its amount; older commands
            // carry none.
            Kind::RefundPayment => {
                if self.amount.is_some() {
                    self.positive_amount()?;
                }
            }
            Kind::StockFailed | Kind::PaymentFailed | Kind::OrderCancelled => {
                let reason = self.reason.as_deref().unwrap_or_default();
                if reason.is_empty() {
                    return Err("reason is missing".into());
                }
                if reason.len() > MAX_REASON {
                    return Err(format!("reason is over {MAX_REASON} bytes"));
                }
            }
            Kind::ReleaseStock
            | Kind::CommitStock
            | Kind::StockReserved
            | Kind::StockReleased
            | Kind::StockCommitted => {}
        }
        Ok(())
    }

    /// The account and amount of a charge, checked.
    pub fn charge(&self) -> Result<(&str, Money), String> {
        let account = self.account_id.as_deref().ok_or("account_id is missing")?;
        check_name(account).map_err(|m| format!("account_id {m}"))?;
        self.positive_amount()?;
        Ok((account, self.amount.unwrap_or(Money::ZERO)))
    }

    fn positive_amount(&self) -> Result<(), String> {
        let amount = self.amount.ok_or("amount is missing")?;
        amount.check().map_err(|m| format!("amount {m}"))?;
        if amount == Money::ZERO {
            return Err("amount must be above zero".into());
        }
        Ok(())
    }

    /// The body.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("saga messages serialize")
    }
}

/// Why a body is not a saga message; the inbox's poison classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// `bad_json`.
    NotJson(String),
    /// `unknown_type`.
    UnknownType(String),
    /// `invalid`.
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_exact_amounts() {
        let m = SagaMessage {
            account_id: Some("acc-1".into()),
            ..SagaMessage::new(Kind::ChargePayment, "ORD-1").amount("0.3".parse().unwrap())
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"type":"ChargePayment","order_id":"ORD-1","account_id":"acc-1","amount":0.3}"#
        );
        assert_eq!(SagaMessage::decode(text.as_bytes()), Ok(m));
    }

    #[test]
    fn each_kind_of_bad_body_is_told_apart() {
        assert!(matches!(
            SagaMessage::decode(b"{"),
            Err(DecodeError::NotJson(_))
        ));
        assert!(matches!(
            SagaMessage::decode(br#"{"type":"Teleport","order_id":"A"}"#),
            Err(DecodeError::UnknownType(_))
        ));
        for bad in [
            r#"{"type":"ChargePayment","order_id":"A","amount":1}"#,
            r#"{"type":"ChargePayment","order_id":"A","account_id":"x","amount":0}"#,
            r#"{"type":"ChargePayment","order_id":"A","account_id":"x","amount":0.001}"#,
            r#"{"type":"ReserveStock","order_id":"A","lines":[]}"#,
            r#"{"type":"ReserveStock","order_id":"A","lines":[{"product_id":"p","quantity":-1}]}"#,
            r#"{"type":"StockFailed","order_id":"A"}"#,
            &format!(
                r#"{{"type":"OrderCancelled","order_id":"A","reason":"{}"}}"#,
                "x".repeat(1025)
            ),
            r#"{"type":"StockReserved","order_id":"has space"}"#,
        ] {
            assert!(
                matches!(
                    SagaMessage::decode(bad.as_bytes()),
                    Err(DecodeError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_kind_has_one_topic_and_a_name_that_parses_back() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert!(kind.topic().kinds().contains(&kind));
        }
    }
}

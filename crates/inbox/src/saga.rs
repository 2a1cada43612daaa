//! Decoding for the saga's consumers (orchestrator, inventory, payments,
//! notifier).

use saga::messages::{DecodeError, Voucher};
use saga::{Kind, SagaMessage, Topic};
use sink::signing::{Keyring, Refusal};

use crate::{Incoming, Poison};

/// A command with the message id it came under, which its answer names
/// (`in_reply_to`).
#[derive(Debug, Clone)]
pub struct Received {
    /// The message id.
    pub id: String,
    /// The command.
    pub message: SagaMessage,
    /// A `ReserveStock` as it came, endorsement and all, for the
    /// `StockReserved` to carry to payments.
    pub voucher: Option<Voucher>,
}

/// [`decode`] for a service's commands, keeping their message id.
pub fn decode_command(
    topics: &[Topic],
    keys: &Keyring,
    incoming: &Incoming,
) -> Result<Received, Poison> {
    let message = decode(topics, keys, incoming)?;
    let id = incoming.id.clone().unwrap_or_default();
    let voucher = (message.kind == Kind::ReserveStock).then(|| Voucher {
        id: id.clone(),
        // decode parsed it as JSON, so it is UTF-8.
        body: String::from_utf8_lossy(&incoming.payload).into_owned(),
        endorsement: incoming
            .signature
            .as_deref()
            .and_then(sink::signing::endorsements),
    });
    Ok(Received {
        id,
        message,
        voucher,
    })
}

/// The charge a `StockReserved` passes on: the `ReserveStock` it carries,
/// which must be endorsed with a key of `payment.commands` when `keys`
/// has one (`unsigned` or `forged` otherwise), be about the same order,
/// and name an account and an amount. Answers the command's id, the
/// account and the amount.
pub fn charge_of(
    keys: &Keyring,
    answer: &SagaMessage,
) -> Result<(String, String, domain::Money), Poison> {
    let endorser = Topic::PaymentCommands.as_str();
    let voucher = answer.voucher.as_ref().ok_or_else(|| {
        Poison::new(
            "invalid",
            "StockReserved carries no ReserveStock (voucher) to charge",
        )
    })?;
    keys.verify_endorsement(
        endorser,
        &voucher.id,
        voucher.body.as_bytes(),
        voucher.endorsement.as_deref(),
    )
    .map_err(|refusal| {
        let class = match refusal {
            Refusal::Unsigned => "unsigned",
            Refusal::Forged => "forged",
        };
        Poison::new(
            class,
            format!("the ReserveStock in StockReserved is not endorsed with a key of {endorser}"),
        )
    })?;
    let command = SagaMessage::decode(voucher.body.as_bytes())
        .map_err(|e| Poison::new("invalid", format!("the voucher is no command: {e:?}")))?;
    if command.kind != Kind::ReserveStock || command.order_id != answer.order_id {
        return Err(Poison::new(
            "invalid",
            format!(
                "the voucher is a {} of {}, not the ReserveStock of {}",
                command.kind, command.order_id, answer.order_id
            ),
        ));
    }
    let (account, amount) = command
        .charge()
        .map_err(|m| Poison::new("invalid", format!("the voucher's charge: {m}")))?;
    Ok((voucher.id.clone(), account.to_owned(), amount))
}

/// Decodes a saga message that must travel on one of `topics`, telling
/// apart the kinds of poison; on a topic `keys` covers, its signature must
/// be one of the topic's keys (`unsigned` or `forged` otherwise).
pub fn decode(
    topics: &[Topic],
    keys: &Keyring,
    incoming: &Incoming,
) -> Result<SagaMessage, Poison> {
    let message = SagaMessage::decode(&incoming.payload).map_err(|e| match e {
        DecodeError::NotJson(m) => Poison::new("bad_json", m),
        DecodeError::UnknownType(m) => Poison::new("unknown_type", m),
        DecodeError::Invalid(m) => Poison::new("invalid", m),
    })?;
    if !topics.contains(&message.kind.topic()) {
        return Err(Poison::new(
            "unknown_type",
            format!("{} is not for this consumer", message.kind),
        ));
    }
    let topic = message.kind.topic().as_str();
    let id = incoming.id.as_deref().unwrap_or_default();
    keys.verify(topic, id, &incoming.payload, incoming.signature.as_deref())
        .map_err(|refusal| match refusal {
            Refusal::Unsigned => Poison::new(
                "unsigned",
                format!(
                    "{} on {topic} carries no signature, and {topic} is signed",
                    message.kind
                ),
            ),
            Refusal::Forged => Poison::new(
                "forged",
                format!(
                    "the signature of {} on {topic} is not one of its keys'",
                    message.kind
                ),
            ),
        })?;
    Ok(message)
}

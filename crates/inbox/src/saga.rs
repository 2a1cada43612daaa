//! Decoding for the saga's consumers (orchestrator, inventory, payments,
//! notifier).

use saga::messages::DecodeError;
use saga::{SagaMessage, Topic};
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
}

/// [`decode`] for a service's commands, keeping their message id.
pub fn decode_command(
    topics: &[Topic],
    keys: &Keyring,
    incoming: &Incoming,
) -> Result<Received, Poison> {
    Ok(Received {
        id: incoming.id.clone().unwrap_or_default(),
        message: decode(topics, keys, incoming)?,
    })
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

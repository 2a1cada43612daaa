//! Decoding for the saga's consumers (orchestrator, inventory, payments,
//! notifier).

use saga::messages::DecodeError;
use saga::{SagaMessage, Topic};

use crate::{Incoming, Poison};

/// Decodes a saga message that must travel on one of `topics`, telling
/// apart the three kinds of poison.
pub fn decode(topics: &[Topic], incoming: &Incoming) -> Result<SagaMessage, Poison> {
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
    Ok(message)
}

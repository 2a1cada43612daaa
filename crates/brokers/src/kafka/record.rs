//! A Kafka record of an outbox message, and what a failed produce means.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use sink::{Failure, FailureKind, Message};

use crate::headers;

/// The headers of `m`'s record.
pub(super) fn record_headers(m: &Message) -> OwnedHeaders {
    let (event_id, version) = (m.event_id.to_string(), m.version.to_string());
    let mut h = OwnedHeaders::new_with_capacity(5)
        .insert(header(headers::EVENT_ID, &event_id))
        .insert(header(headers::TYPE, &m.kind))
        .insert(header(headers::VERSION, &version));
    if let Some(tp) = &m.traceparent {
        h = h.insert(header(headers::TRACEPARENT, tp));
    }
    if let Some(signature) = &m.signature {
        h = h.insert(header(headers::SIGNATURE, signature));
    }
    h
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// What a failed produce means for the outbox row.
pub(super) fn classify(e: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let code = e.rdkafka_error_code();
    let (kind, class, counts) = match code {
        // The message itself is unacceptable: retrying cannot help.
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed,
        ) => (FailureKind::Permanent, "rejected", false),
        // Our own queue is full: we are too fast, not the broker unwell.
        Some(C::QueueFull) => (FailureKind::Transient, "queue_full", false),
        Some(C::MessageTimedOut) => (FailureKind::Transient, "timeout", true),
        _ => (FailureKind::Transient, "broker", true),
    };
    Failure {
        kind,
        class,
        counts_against_destination: counts,
        retry_after: None,
        detail: format!("kafka: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_message_is_permanent_and_an_unreachable_broker_transient() {
        let too_big = classify(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert_eq!(too_big.kind, FailureKind::Permanent);
        assert!(!too_big.counts_against_destination);
        let timeout = classify(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ));
        assert_eq!(
            (
                timeout.kind,
                timeout.class,
                timeout.counts_against_destination
            ),
            (FailureKind::Transient, "timeout", true)
        );
        let full = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
        assert!(!full.counts_against_destination);
    }
}

//! The embedded transport: a consumer fed straight from the outbox, for one
//! machine without a broker. The relay's delivery engine claims the
//! consumer's outbox rows like any destination's (in order per key, with
//! retries and dead letters) and this sink applies each through the inbox.
//! A poison message becomes a dead outbox row with its reason, listed and
//! replayed like any other.

use sink::{Failure, FailureKind, Message, Outcome, Sink};

use crate::{Consumer, Incoming, Verdict};

/// A consumer as an outbox destination.
pub struct LocalSink<C> {
    inbox: C,
}

impl<C: Consumer> LocalSink<C> {
    /// Delivers to `inbox`: an [`Inbox`](crate::Inbox), in this database
    /// or another one, or any other consumer in this process.
    pub fn new(inbox: C) -> Self {
        Self { inbox }
    }
}

#[async_trait::async_trait]
impl<C: Consumer + 'static> Sink for LocalSink<C> {
    async fn deliver(&self, message: &Message) -> Outcome {
        let incoming = Incoming {
            id: Some(message.event_id.to_string()),
            payload: message.payload.get().as_bytes().to_vec(),
            origin: format!("outbox/{}@{}", message.aggregate_id, message.version),
            signature: message.signature.clone(),
        };
        let verdicts = self.inbox.process(&[incoming]).await.map_err(|e| Failure {
            kind: FailureKind::Transient,
            class: "database",
            counts_against_destination: true,
            retry_after: None,
            detail: e.to_string(),
        })?;
        match verdicts.into_iter().next() {
            Some(Verdict::Dead(poison)) => Err(Failure {
                kind: FailureKind::Permanent,
                class: poison.class,
                counts_against_destination: false,
                retry_after: None,
                detail: poison.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

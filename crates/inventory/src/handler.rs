//! The consumer of the saga's stock commands.

use inbox::saga::Received;
use inbox::{Handler, Incoming, Poison};
use saga::{Kind, Topic};
use sink::signing::Keyring;
use sqlx::PgConnection;
use store::saga::SagaRoute;

use crate::stock;

/// Applies `ReserveStock`, `ReleaseStock` and `CommitStock`, and writes
/// each answer to the outbox for `route`.
pub struct Inventory {
    route: SagaRoute,
    keys: Keyring,
}

impl Inventory {
    /// Answers along `route`.
    pub fn new(route: SagaRoute) -> Self {
        Self {
            route,
            keys: Keyring::default(),
        }
    }

    /// Requires the signature of `keys` on the commands' topic, when it
    /// has a key there.
    pub fn with_keys(mut self, keys: Keyring) -> Self {
        self.keys = keys;
        self
    }
}

#[async_trait::async_trait]
impl Handler for Inventory {
    type Message = Received;

    fn decode(&self, incoming: &Incoming) -> Result<Received, Poison> {
        inbox::saga::decode_command(&[Topic::ReserveCommands], &self.keys, incoming)
    }

    async fn apply(&self, conn: &mut PgConnection, r: &Received) -> sqlx::Result<()> {
        let m = &r.message;
        let reply = match m.kind {
            Kind::ReserveStock => Some(stock::reserve(conn, &m.order_id, &m.lines).await?),
            Kind::ReleaseStock => stock::release(conn, &m.order_id).await?,
            Kind::CommitStock => stock::commit(conn, &m.order_id).await?,
            other => unreachable!("decode admits only stock commands, not {other}"),
        };
        match reply {
            Some(reply) => {
                let reply = reply.replying_to(&r.id);
                Ok(store::saga::send(conn, &self.route, &reply).await?)
            }
            None => Ok(()),
        }
    }
}

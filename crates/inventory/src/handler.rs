//! The consumer of the saga's stock commands, and of `OrderCompleted`,
//! which sells the order's reservation.

use inbox::saga::Received;
use inbox::{Handler, Incoming, Poison};
use saga::{Kind, Topic};
use sink::signing::Keyring;
use sqlx::PgConnection;
use store::saga::SagaRoute;

use crate::stock;

/// Applies `ReserveStock`, `ReleaseStock`, `CommitStock` and
/// `OrderCompleted`, and writes each answer to the outbox for `route`.
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

    /// Requires the signature of `keys` on the topics it reads, where it
    /// has a key.
    pub fn with_keys(mut self, keys: Keyring) -> Self {
        self.keys = keys;
        self
    }
}

#[async_trait::async_trait]
impl Handler for Inventory {
    type Message = Received;

    fn decode(&self, incoming: &Incoming) -> Result<Received, Poison> {
        inbox::saga::decode_command(&[Topic::ReserveCommands, Topic::Saga], &self.keys, incoming)
    }

    async fn apply(&self, conn: &mut PgConnection, r: &Received) -> sqlx::Result<()> {
        let m = &r.message;
        let reply = match m.kind {
            Kind::ReserveStock => {
                let mut reply = stock::reserve(conn, &m.order_id, &m.lines).await?;
                if reply.kind == Kind::StockReserved {
                    reply.voucher = r.voucher.clone();
                }
                Some(reply)
            }
            Kind::ReleaseStock => stock::release(conn, &m.order_id).await?,
            Kind::CommitStock => stock::commit(conn, &m.order_id).await?,
            // The saga's word: the sale needs no answer.
            Kind::OrderCompleted => {
                stock::commit(conn, &m.order_id).await?;
                None
            }
            // Its queue on RabbitMQ is bound to OrderCompleted only; a
            // Kafka group reads the whole topic.
            Kind::OrderCancelled => None,
            other => unreachable!("decode admits only stock commands and outcomes, not {other}"),
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

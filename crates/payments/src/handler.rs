//! The consumer of the saga's payment commands.

use domain::Money;
use inbox::saga::Received;
use inbox::{Handler, Incoming, Poison};
use saga::{Kind, Topic};
use sink::signing::Keyring;
use sqlx::PgConnection;
use store::saga::SagaRoute;

use crate::ledger;

/// Applies `ChargePayment` and `RefundPayment`, and writes each answer to
/// the outbox for `route`.
pub struct Payments {
    route: SagaRoute,
    keys: Keyring,
}

impl Payments {
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
impl Handler for Payments {
    type Message = Received;

    fn decode(&self, incoming: &Incoming) -> Result<Received, Poison> {
        inbox::saga::decode_command(&[Topic::PaymentCommands], &self.keys, incoming)
    }

    async fn apply(&self, conn: &mut PgConnection, r: &Received) -> sqlx::Result<()> {
        let m = &r.message;
        let reply = match m.kind {
            Kind::ChargePayment => {
                // decode checked both.
                let account = m.account_id.as_deref().unwrap_or_default();
                let amount = m.amount.unwrap_or(Money::ZERO);
                ledger::charge(conn, &m.order_id, account, amount).await?
            }
            Kind::RefundPayment => ledger::refund(conn, &m.order_id, m.amount).await?,
            other => unreachable!("decode admits only payment commands, not {other}"),
        };
        Ok(store::saga::send(conn, &self.route, &reply.replying_to(&r.id)).await?)
    }
}

//! The consumer of the saga's payment commands.

use domain::Money;
use inbox::{Handler, Incoming, Poison};
use saga::{Kind, SagaMessage, Topic};
use sqlx::PgConnection;
use store::saga::SagaRoute;

use crate::ledger;

/// Applies `ChargePayment` and `RefundPayment`, and writes each answer to
/// the outbox for `route`.
pub struct Payments {
    route: SagaRoute,
}

impl Payments {
    /// Answers along `route`.
    pub fn new(route: SagaRoute) -> Self {
        Self { route }
    }
}

#[async_trait::async_trait]
impl Handler for Payments {
    type Message = SagaMessage;

    fn decode(&self, incoming: &Incoming) -> Result<SagaMessage, Poison> {
        inbox::saga::decode(&[Topic::PaymentCommands], incoming)
    }

    async fn apply(&self, conn: &mut PgConnection, m: &SagaMessage) -> sqlx::Result<()> {
        let reply = match m.kind {
            Kind::ChargePayment => {
                // decode checked both.
                let account = m.account_id.as_deref().unwrap_or_default();
                let amount = m.amount.unwrap_or(Money::ZERO);
                ledger::charge(conn, &m.order_id, account, amount).await?
            }
            Kind::RefundPayment => ledger::refund(conn, &m.order_id).await?,
            other => unreachable!("decode admits only payment commands, not {other}"),
        };
        Ok(store::saga::send(conn, &self.route, &reply).await?)
    }
}

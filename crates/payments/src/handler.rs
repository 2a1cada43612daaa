//! The consumer of the saga's payment commands, and of `StockReserved`,
//! whose endorsed `ReserveStock` is the charge.

use domain::Money;
use inbox::{Handler, Incoming, Poison};
use saga::{Kind, Topic};
use sink::signing::Keyring;
use sqlx::PgConnection;
use store::saga::SagaRoute;

use crate::ledger;

/// Applies `ChargePayment`, `RefundPayment` and the charge a
/// `StockReserved` passes on, and writes each answer to the outbox for
/// `route`.
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

    /// Requires the signature of `keys` on the topics it reads, and the
    /// endorsement of a `StockReserved`'s charge, where it has a key.
    pub fn with_keys(mut self, keys: Keyring) -> Self {
        self.keys = keys;
        self
    }
}

#[async_trait::async_trait]
impl Handler for Payments {
    type Message = Command;

    fn decode(&self, incoming: &Incoming) -> Result<Command, Poison> {
        let r = inbox::saga::decode_command(
            &[Topic::PaymentCommands, Topic::Reserve],
            &self.keys,
            incoming,
        )?;
        Ok(match r.message.kind {
            Kind::StockReserved => {
                let (id, account, amount) = inbox::saga::charge_of(&self.keys, &r.message)?;
                Command::Charge {
                    order: r.message.order_id,
                    id,
                    account,
                    amount,
                }
            }
            // Its queue on RabbitMQ is bound to StockReserved only; a
            // Kafka group reads the whole topic.
            Kind::StockFailed | Kind::StockReleased | Kind::StockCommitted => Command::None,
            Kind::ChargePayment => {
                let (account, amount) =
                    r.message.charge().map_err(|m| Poison::new("invalid", m))?;
                Command::Charge {
                    order: r.message.order_id.clone(),
                    account: account.to_owned(),
                    amount,
                    id: r.id,
                }
            }
            Kind::RefundPayment => Command::Refund {
                order: r.message.order_id,
                amount: r.message.amount,
                id: r.id,
            },
            other => unreachable!("decode_command admits only these topics, not {other}"),
        })
    }

    async fn apply(&self, conn: &mut PgConnection, command: &Command) -> sqlx::Result<()> {
        let (reply, id) = match command {
            Command::Charge {
                order,
                id,
                account,
                amount,
            } => (ledger::charge(conn, order, account, *amount).await?, id),
            Command::Refund { order, amount, id } => {
                (ledger::refund(conn, order, *amount).await?, id)
            }
            Command::None => return Ok(()),
        };
        Ok(store::saga::send(conn, &self.route, &reply.replying_to(id)).await?)
    }
}

/// What payments does with a message.
#[derive(Debug, Clone)]
pub enum Command {
    /// Charge `amount` to `account` for `order`, answering command `id`
    /// (a `ChargePayment`, or the `ReserveStock` a `StockReserved` carries).
    Charge {
        /// The order.
        order: String,
        /// The command the answer names.
        id: String,
        /// Who pays.
        account: String,
        /// How much.
        amount: Money,
    },
    /// Refund what `order` was charged (when `amount` is given, only if
    /// it is that), answering `RefundPayment` `id`.
    Refund {
        /// The order.
        order: String,
        /// The charge it compensates; older commands carry none.
        amount: Option<Money>,
        /// The command the answer names.
        id: String,
    },
    /// Not for payments: acknowledged, nothing done.
    None,
}

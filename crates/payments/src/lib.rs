//! payments (seed 003): accounts with exact balances and one payment per
//! order, in its own database.
//!
//! - [`ledger`]: the SQL: accounts, top-ups, charges and refunds.
//! - [`handler`]: the inbox consumer of the saga's `ChargePayment` and
//!   `RefundPayment`; each answer goes to this database's outbox in the
//!   same transaction.
//! - [`http`]: the API that opens accounts, tops them up, and reads
//!   balances and payments.

pub mod handler;
pub mod http;
pub mod ledger;

pub use handler::Payments;

/// payments' own migrations, applied after the shared platform tables.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/payments");

/// The consumer name in the inbox.
pub const CONSUMER: &str = "payments";

/// Brings payments' database up to date.
pub async fn migrate(pool: &sqlx::PgPool) -> store::Result<()> {
    store::migrate_service(pool, &MIGRATOR).await
}

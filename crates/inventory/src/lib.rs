//! inventory (seed 004): stock per product and one all-or-nothing
//! reservation per order, in its own database.
//!
//! - [`stock`]: the SQL: reserve, release, commit, and stock levels.
//! - [`handler`]: the inbox consumer of the saga's `ReserveStock`,
//!   `ReleaseStock` and `CommitStock`; each answer goes to this database's
//!   outbox in the same transaction.
//! - [`http`]: the API that sets and reads stock levels.

pub mod handler;
pub mod http;
pub mod stock;

pub use handler::Inventory;

/// inventory's own migrations, applied after the shared platform tables.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/inventory");

/// The consumer name in the inbox.
pub const CONSUMER: &str = "inventory";

/// Brings inventory's database up to date.
pub async fn migrate(pool: &sqlx::PgPool) -> store::Result<()> {
    store::migrate_service(pool, &MIGRATOR).await
}

//! PostgreSQL access for orders-center: the order repository, the outbox
//! (writes in `outbox`, the claim engine's SQL in `tasks`) and the embedded migrator. All SQL of the service lives here.

mod checkout;
mod error;
mod idempotency;
mod leases;
pub mod log;
mod maintenance;
mod orders;
pub mod outbox;
pub mod saga;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use domain::Routes;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use error::{Error, Result};
pub use idempotency::{CreateOutcome, IdempotencyKey, RequestHash};
pub use leases::{LeaseHeld, LEADER_CHANNEL};
pub use maintenance::{Backlog, LIVE_COUNTS};
pub use orders::{
    Cursor, ListFilter, Page, Precondition, SaveContext, Saved, ORDER_CHANGED_CHANNEL,
};
pub use outbox::NOTIFY_CHANNEL;
pub use tasks::{sql as claim_sql, ClaimSpec, ClaimToken, Claimed, ClaimedTask, EventId, TaskId};

/// The schema migrations from `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The tables every service database shares with the orders database
/// (outbox, backlog, leases, inbox, idempotency keys), from
/// `migrations/services/`.
static SERVICE_PLATFORM: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/services");

/// Applies a service's migrations (`own`, from its folder under
/// `migrations/`) after the shared platform tables, as one history.
pub async fn migrate_service(pool: &PgPool, own: &sqlx::migrate::Migrator) -> Result<()> {
    let migrations: Vec<_> = SERVICE_PLATFORM.iter().chain(own.iter()).cloned().collect();
    let migrator = sqlx::migrate::Migrator {
        migrations: migrations.into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    migrator.run(pool).await.map_err(Error::Migrate)
}

/// Pool settings the roles choose from their config.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a request waits for a connection before the database counts
    /// as unavailable (503), instead of hanging.
    pub acquire_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens a pool lazily: a role starts even while the database is down and
/// reports it through `/readyz`.
pub fn connect_lazy(url: &str, config: &PoolConfig) -> Result<PgPool> {
    let options: PgConnectOptions = url.parse().map_err(Error::from)?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect_lazy_with(options.application_name("orders-center")))
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await.map_err(Error::Migrate)
}

/// The repository every role shares; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    routes: Arc<Routes>,
    saga: Arc<saga::SagaConfig>,
}

impl Store {
    /// Wraps a pool; saves send their events along the default routes
    /// (every version to 1C).
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            routes: Arc::default(),
            saga: Arc::default(),
        }
    }

    /// Sends the events of every save along `routes` instead.
    pub fn with_routes(mut self, routes: Routes) -> Self {
        self.routes = Arc::new(routes);
        self
    }

    /// Runs sagas with `config`.
    pub fn with_saga(mut self, config: saga::SagaConfig) -> Self {
        self.saga = Arc::new(config);
        self
    }

    /// How sagas run.
    pub fn saga_config(&self) -> &saga::SagaConfig {
        &self.saga
    }

    /// Where saves send their events.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Round-trips a trivial query, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

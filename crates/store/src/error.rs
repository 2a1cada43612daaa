use domain::OrderId;

/// Store results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to PostgreSQL, sorted by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No order has this id.
    #[error("order {0} not found")]
    NotFound(OrderId),
    /// `If-Match` named a version the order does not have (or the order is absent).
    #[error("order {id} is at version {current:?}, not {expected}")]
    VersionMismatch {
        /// The order.
        id: OrderId,
        /// The version the caller expected.
        expected: i64,
        /// The version it has; `None` when it does not exist.
        current: Option<i64>,
    },
    /// The order exists but the caller required that it does not.
    #[error("order {0} already exists")]
    AlreadyExists(OrderId),
    /// An idempotency key was reused for a different request.
    #[error("idempotency key {0:?} was used for a different request")]
    IdempotencyKeyReused(String),
    /// A list cursor that this service did not issue.
    #[error("invalid cursor")]
    InvalidCursor,
    /// The database cannot be reached or is shutting down; retry later.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A migration failed.
    #[error("migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Any other database error; a bug or a broken invariant.
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

/// Errors that say "the database is not there right now" rather than "this
/// request is wrong": the API answers them with 503 and `Retry-After`.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: shutdown / cannot connect now;
            // 53300: too many connections.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

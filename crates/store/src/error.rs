use domain::OrderId;

/// Store results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to PostgreSQL, sorted by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No order has this id.
    #[error("order {0} not found")]
    NotFound(OrderId),
    /// The order's state did not meet the caller's [`Precondition`](crate::Precondition).
    #[error("{}", precondition_message(.id, .required, .current))]
    PreconditionFailed {
        /// The order.
        id: OrderId,
        /// What the caller required.
        required: crate::Precondition,
        /// The version it has; `None` when it does not exist.
        current: Option<i64>,
    },
    /// A checkout came with a save that replaces an existing order; a saga
    /// starts only with its order.
    #[error("order {0} exists: a checkout is accepted only when the order is created")]
    CheckoutOnExisting(OrderId),
    /// A change of a saga order's status or price from outside its saga,
    /// while it runs or after it ended: those two fields are the saga's.
    #[error(
        "order {order} is run by its saga (now {state}): its {field} changes only through the saga"
    )]
    SagaOwns {
        /// The order.
        order: OrderId,
        /// The saga's state.
        state: String,
        /// `status` or `price`.
        field: &'static str,
    },
    /// An answer that does not match what the saga asked for.
    #[error("an answer for the saga of order {order} does not match its command: {detail}")]
    AnswerMismatch {
        /// The order.
        order: OrderId,
        /// What differs.
        detail: String,
    },
    /// A checkout where no saga can run: no broker, outside `dev`.
    #[error("this deployment runs no sagas: a checkout needs --broker (or `orders-center dev`)")]
    SagasDisabled,
    /// No task has this id.
    #[error("task {0} not found")]
    TaskNotFound(crate::TaskId),
    /// The task cannot be replayed.
    #[error("task {id} cannot be replayed: {reason}")]
    TaskNotReplayable {
        /// The task.
        id: crate::TaskId,
        /// Why not.
        reason: String,
    },
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
    /// Stored data breaks an invariant the code relies on; a bug.
    #[error("broken invariant: {0}")]
    Invariant(String),
    /// Any other database error.
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

fn precondition_message(
    id: &OrderId,
    required: &crate::Precondition,
    current: &Option<i64>,
) -> String {
    use crate::Precondition as P;
    match (required, current) {
        (P::Absent, _) => format!("order {id} already exists"),
        (_, None) => format!("order {id} does not exist"),
        (P::Version(v), Some(c)) => format!("order {id} is at version {c}, not {v}"),
        (_, Some(c)) => format!("order {id} is at version {c}"),
    }
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

/// For callers that answer in `sqlx` terms (inbox handlers): a database
/// error stays itself, so the inbox can tell an outage from a refusal.
impl From<Error> for sqlx::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable(e) | Error::Database(e) => e,
            // A refusal of this input: no retry will change it.
            e @ (Error::SagaOwns { .. }
            | Error::CheckoutOnExisting(_)
            | Error::AnswerMismatch { .. }) => sqlx::Error::InvalidArgument(e.to_string()),
            e => sqlx::Error::Protocol(e.to_string()),
        }
    }
}

//! What the relay's jobs can fail with.

/// A job run failed; the job runs again at its next tick.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The outbox could not be read or written.
    #[error("outbox access failed")]
    Store(#[from] store::Error),
}

/// Relay results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

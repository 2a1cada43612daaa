//! The background machinery every orders-center role shares, whatever it
//! does: a [`Cron`] of named jobs on a bounded [`WorkerPool`], scoped to
//! every pod or to the elected [`Leader`]; the election itself; a [`Clock`],
//! [`Backoff`] and a [`CircuitBreaker`]; LISTEN wake-ups; and the
//! [`Supervisor`] that stops the process when a long-running task dies.

pub mod backoff;
pub mod breaker;
pub mod clock;
pub mod cron;
pub mod leader;
pub mod pool;
pub mod supervisor;
pub mod wakeup;

pub use backoff::Backoff;
pub use breaker::{Admission, BreakerConfig, BreakerState, CircuitBreaker};
#[cfg(any(test, feature = "mock"))]
pub use clock::MockClock;
pub use clock::{Clock, SystemClock};
pub use cron::{Cron, Job, JobError, JobFn, PoolCron, Progress, Scope, TickObserver};
pub use leader::{AlwaysLeader, ElectionConfig, Elector, KubeLease, Leader, LeaseLock, PgLease};
pub use pool::{PoolClosed, WorkerPool};
pub use supervisor::{causes, Supervisor, TaskDied};

#[cfg(any(test, feature = "mock"))]
pub use cron::MockCron;
#[cfg(any(test, feature = "mock"))]
pub use leader::MockLeader;

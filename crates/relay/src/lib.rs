//! `order_eno_1c`: the relay that delivers the `onec_tasks` outbox to 1C.
//!
//! The [`TaskService`] claims tasks, delivers them and records the outcome.
//! It receives a [`Cron`] by injection and registers its jobs there; the
//! [`PoolCron`] runs those jobs on a bounded [`WorkerPool`], which the task
//! service never sees. [`Relay`] wires it all together for one process.

pub mod backoff;
pub mod breaker;
pub mod clock;
pub mod cron;
pub mod leader;
pub mod metrics;
pub mod pool;
pub mod protect;
mod runtime;
pub mod service;
pub mod wakeup;

pub use backoff::Backoff;
pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use clock::{Clock, SystemClock};
pub use cron::{Cron, Job, PoolCron, Progress, Scope};
pub use leader::{AlwaysLeader, ElectionConfig, Elector, KubeLease, Leader, LeaseLock, PgLease};
pub use metrics::RelayMetrics;
pub use pool::{PoolClosed, WorkerPool};
pub use protect::{Attempt, OnecGuard, ProtectionConfig};
pub use runtime::{Leadership, Relay, RelayConfig};
pub use service::{decide, Decision, ServiceConfig, TaskService};

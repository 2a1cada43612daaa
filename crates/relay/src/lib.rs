//! `order_eno_1c`: the relay that delivers the `onec_tasks` outbox to 1C.
//!
//! The [`TaskService`] claims tasks, delivers them and records the outcome.
//! It receives a [`Cron`] by injection and registers its jobs there; the
//! [`PoolCron`] runs those jobs on a bounded [`WorkerPool`], which the task
//! service never sees. [`run`] wires it all together for one process.

pub mod backoff;
pub mod breaker;
pub mod clock;
pub mod cron;
pub mod pool;

pub use backoff::Backoff;
pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use clock::{Clock, SystemClock};
pub use cron::{Cron, Job, PoolCron, Progress};
pub use pool::{PoolClosed, WorkerPool};

//! The relay: one delivery engine for every outbox destination.
//!
//! - [`engine`]: per destination, claims a batch under the destination's
//!   [`DeliveryPolicy`](domain::DeliveryPolicy), delivers each message
//!   through its [`Sink`](sink::Sink) and records the outcome; [`decide`] is
//!   the retry policy.
//! - [`log_engine`]: per event-stream destination read from the log, claims
//!   a partition, delivers its next run as one batch and moves its cursor
//!   (the log's SQL is `store::log`).
//! - [`guard`]: what stands in front of each sink: in-flight limit, rate
//!   limit, circuit breaker.
//! - [`controls`]: each destination's live settings (paused, batch size,
//!   limits, breaker), which an operator may change while it runs.
//! - [`upkeep`]: the leader's jobs over the whole outbox: rescuing expired
//!   claims, retention, backlog figures.
//! - [`Relay`] wires them onto the shared `worker` runtime for one process.
//!
//! The claim SQL lives in the `store` crate (`tasks.rs`); the cron, pool,
//! election, breaker and supervisor in the `worker` crate.

pub mod controls;
pub mod engine;
mod error;
pub mod guard;
pub mod log_engine;
pub mod metrics;
mod runtime;
pub mod upkeep;

pub use controls::{Controls, Settings};
pub use engine::{decide, Decision, DeliveryEngine, ServiceConfig};
pub use error::{Error, Result};
pub use guard::{Attempt, ProtectionConfig, SinkGuard};
pub use log_engine::LogEngine;
pub use metrics::RelayMetrics;
pub use runtime::{Leadership, Outlet, Relay, RelayConfig};
pub use upkeep::Upkeep;

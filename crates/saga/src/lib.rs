//! The order saga (seeds 001, 003, 004), orchestrated by orders-center.
//!
//! - [`messages`]: the wire contract between orders-center, `inventory`,
//!   `payments` and `notifier`: commands, their answers and the outcomes,
//!   with the topic (aggregate type) each travels on.
//! - [`transition`]: the state machine, a pure function
//!   `(state, event) → (state, commands, chain steps, deadline)`.
//!
//! The SQL that stores sagas and their chain is in the `store` crate
//! (`saga.rs`); the services' own tables are in their crates.

pub mod messages;
pub mod transition;

pub use messages::{Checkout, Kind, Line, SagaMessage, Topic};
pub use transition::{replay, transition, Command, Deadline, Event, State, Step, Transition};

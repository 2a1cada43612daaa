//! The relay against real PostgreSQL, with the 1C mock served in-process over
//! HTTP, or a mocked client or sink where a failure must be forced.

mod delivery;
mod engine;
mod log_engine;
mod overlap;
mod support;

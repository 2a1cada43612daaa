//! Integration tests of the API on real PostgreSQL, one database per test.

mod auth;
mod bad_input;
mod cache;
mod create;
mod money;
mod ops;
mod read;
mod saga;
mod save;
mod support;
mod sync;

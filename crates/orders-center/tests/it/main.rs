//! End-to-end tests of the `orders-center` binary, run as a user runs it.

mod dev;
mod e2e;
mod observability;
mod outbox_relay;
mod roles;
mod support;

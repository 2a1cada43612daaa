//! End-to-end tests of the `orders-center` binary, run as a user runs it.

mod dev;
mod roles;
mod support;

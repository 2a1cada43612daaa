//! The OutboxRelay resource's relay side, against a scripted API server
//! (`tower_test::mock::pair`) and, for claims, a real PostgreSQL.

mod spec_watch;
mod status;
mod support;

//! Integration tests of the store on real PostgreSQL, one database per test.

mod claims;
mod outbox;
mod in_order;
mod upgrade;

//! Integration tests of the store on real PostgreSQL, one database per test.

mod batch_save;
mod claims;
mod in_order;
mod outbox;
mod upgrade;

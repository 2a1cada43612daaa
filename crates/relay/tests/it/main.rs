//! The relay against real PostgreSQL, with the 1C mock served in-process over
//! HTTP or a mocked client where a failure must be forced.

mod delivery;
mod support;

//! The relay against real PostgreSQL, with the 1C mock served in-process over
//! HTTP or a mocked client where a failure must be forced, and the kube
//! backend against a real kube-apiserver (behaviour) and a mocked one (exact
//! requests).

mod delivery;
mod engine;
mod kube_api_lease;
mod kube_lease;
mod overlap;
mod pg_election;
mod support;

//! Leader election against real backends: PostgreSQL lease rows, a real
//! kube-apiserver (behaviour) and a mocked one (exact requests).

mod kube_api_lease;
mod kube_lease;
mod pg_election;
mod support;

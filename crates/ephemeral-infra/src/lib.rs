//! Throwaway servers for the tests and `dev`, each on free loopback ports in
//! its own directory under `target/tmp`, stopped and deleted when dropped or
//! when the owning process dies:
//!
//! - [`RabbitMq`]: Debian's `rabbitmq-server` as a node of its own;
//! - [`Kafka`]: Apache Kafka in KRaft mode, from jars fetched with Maven;
//! - [`KubeApi`]: etcd and kube-apiserver built from the Go module proxy,
//!   envtest-style (no kubelet, no scheduler), with RBAC on.
//!
//! What has to be fetched or built ([`prepare_kafka`], [`prepare_kube`]) is
//! cached under `target/infra`, so a machine pays for it once.

mod cache;
pub mod image;
mod kafka;
mod kube;
mod rabbitmq;
mod watchdog;

pub use cache::{infra_dir, tmp_dir, workspace_root};
pub use kafka::{prepare_kafka, Kafka, KAFKA_VERSION};
pub use kube::{prepare_kube, prepare_node, KubeApi, KubeBinaries, KUBERNETES_VERSION};
pub use rabbitmq::RabbitMq;

use std::io;

/// Errors while preparing or starting a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program the server needs is not installed.
    #[error("{program} not found: {hint}")]
    Missing {
        /// The program.
        program: String,
        /// How to install it.
        hint: &'static str,
    },
    /// A fetch or build step failed.
    #[error("{step} failed: {detail}")]
    Prepare {
        /// What was run.
        step: String,
        /// Its exit status and the end of its output.
        detail: String,
    },
    /// The server did not become ready.
    #[error("{server} did not start: {detail}")]
    Start {
        /// Which server.
        server: &'static str,
        /// Why, with the end of its log.
        detail: String,
    },
    /// File system or process error.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// JSON could not be written.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

//! One relay process: the task service on a pool-backed cron, the LISTEN
//! wake-up, and the status endpoints.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use onec::OnecClient;
use store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SystemClock;
use crate::cron::PoolCron;
use crate::leader::{AlwaysLeader, Leader};
use crate::metrics::RelayMetrics;
use crate::pool::WorkerPool;
use crate::protect::{OnecGuard, ProtectionConfig};
use crate::service::{ServiceConfig, TaskService};
use crate::wakeup;

/// Settings of one relay process.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The task service.
    pub service: ServiceConfig,
    /// Protection of 1C.
    pub protection: ProtectionConfig,
}

/// A running relay.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

/// The leader of this process, and the election task to await on shutdown.
pub struct Leadership {
    /// Who leads.
    pub leader: Arc<dyn Leader>,
    /// The election loop, if one runs.
    pub election: Option<JoinHandle<()>>,
}

impl Leadership {
    /// Always the leader (`--leader-election none`).
    pub fn always() -> Self {
        Self {
            leader: Arc::new(AlwaysLeader::default()),
            election: None,
        }
    }
}

struct Inner {
    store: Store,
    leader: Arc<dyn Leader>,
    election: std::sync::Mutex<Option<JoinHandle<()>>>,
    guard: Arc<OnecGuard>,
    pool: WorkerPool,
    cron: PoolCron,
    metrics: Arc<RelayMetrics>,
    listener: std::sync::Mutex<Option<JoinHandle<()>>>,
    shutdown: CancellationToken,
}

impl Relay {
    /// Starts delivering. Everything stops when `shutdown` fires; then
    /// [`Relay::stopped`] finishes what is in flight and releases the rest.
    pub fn start(
        store: Store,
        client: Arc<dyn OnecClient>,
        config: RelayConfig,
        leadership: Leadership,
        shutdown: CancellationToken,
    ) -> Self {
        let metrics = Arc::new(RelayMetrics::new());
        let guard = Arc::new(OnecGuard::new(
            client,
            config.protection,
            Arc::new(SystemClock),
            metrics.clone(),
        ));
        // One worker per claim lane, plus one for the rescue job.
        let pool = WorkerPool::new(config.service.claim_lanes + 1);
        metrics.workers.set(pool.size() as i64);
        let m = metrics.clone();
        let cron = PoolCron::new(pool.clone(), shutdown.clone(), leadership.leader.clone())
            .on_success(Arc::new(move |job| m.ticked(job)));
        let service = TaskService::new(
            store.clone(),
            guard.clone(),
            config.service,
            metrics.clone(),
        );
        service.register(&cron);
        let listener = tokio::spawn(wakeup::listen_for_saves(
            store.pool().clone(),
            service.wake(),
            shutdown.clone(),
        ));
        Self {
            inner: Arc::new(Inner {
                store,
                leader: leadership.leader,
                election: std::sync::Mutex::new(leadership.election),
                guard,
                pool,
                cron,
                metrics,
                listener: std::sync::Mutex::new(Some(listener)),
                shutdown,
            }),
        }
    }

    /// Waits for the shutdown signal, then for every run in flight: sent
    /// deliveries are awaited and recorded, unsent ones released.
    pub async fn stopped(&self) {
        self.inner.shutdown.cancelled().await;
        self.inner.cron.stopped().await;
        self.inner.pool.shutdown().await;
        let tasks = [
            self.inner.listener.lock().expect("not poisoned").take(),
            self.inner.election.lock().expect("not poisoned").take(),
        ];
        for task in tasks.into_iter().flatten() {
            let _ = task.await;
        }
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.inner.metrics
    }

    /// `/healthz`, `/readyz` and `/metrics` of the relay.
    pub fn status_router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }
}

/// Fails while this relay believes it leads but has not renewed its lease
/// for a whole lease duration, so Kubernetes restarts a stuck leader.
async fn healthz(State(relay): State<Relay>) -> impl IntoResponse {
    if relay.inner.leader.healthy() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "leading without a renewed lease"})),
        )
    }
}

async fn readyz(State(relay): State<Relay>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), relay.inner.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "database unavailable"})),
        ),
    }
}

async fn metrics(State(relay): State<Relay>) -> impl IntoResponse {
    let i = &relay.inner;
    i.metrics
        .breaker_state
        .set(i.guard.breaker_state().as_gauge());
    i.metrics.workers_busy.set(i.pool.busy() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        i.metrics.render(i.leader.is_leader()),
    )
}

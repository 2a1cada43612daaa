//! One relay process: a delivery engine per destination and the leader's
//! upkeep on a pool-backed cron, the LISTEN wake-up, and the status
//! endpoints, every long-running task under one supervisor.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use domain::{DeliveryPolicy, Destination};
use sink::Sink;
use store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::{AlwaysLeader, Cron, Leader, PoolCron, Supervisor, SystemClock, TaskDied, WorkerPool};

use crate::controls::Controls;
use crate::engine::{DeliveryEngine, ServiceConfig};
use crate::guard::{ProtectionConfig, SinkGuard};
use crate::metrics::RelayMetrics;
use crate::upkeep::Upkeep;

/// Settings of one relay process.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Delivery settings shared by every destination.
    pub service: ServiceConfig,
}

/// One destination this relay delivers to.
pub struct Outlet {
    /// Its name in the outbox.
    pub destination: Destination,
    /// How it wants one key's messages.
    pub policy: DeliveryPolicy,
    /// What delivers a message there.
    pub sink: Arc<dyn Sink>,
    /// The limits and breaker in front of it.
    pub protection: ProtectionConfig,
}

/// A running relay.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

/// The leader of this process, and the election task, which must run until
/// shutdown.
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
    cron: PoolCron,
    leader: Arc<dyn Leader>,
    controls: Vec<Arc<Controls>>,
    pool: WorkerPool,
    supervisor: Supervisor,
    metrics: Arc<RelayMetrics>,
    backlog: tokio::sync::watch::Receiver<Option<Arc<store::Backlog>>>,
}

impl Relay {
    /// Starts delivering to every outlet. Everything stops when `shutdown`
    /// fires, or when a long-running task dies; then [`Relay::stopped`]
    /// finishes what is in flight and releases the rest.
    pub fn start(
        store: Store,
        outlets: Vec<Outlet>,
        config: RelayConfig,
        leadership: Leadership,
        shutdown: CancellationToken,
    ) -> Self {
        let metrics = Arc::new(RelayMetrics::new());
        let supervisor = Supervisor::new(shutdown);
        // One worker per claim lane of each destination, plus one for the
        // leader's jobs.
        let pool = WorkerPool::new(config.service.claim_lanes * outlets.len().max(1) + 1);
        metrics.workers.set(pool.size() as i64);
        let m = metrics.clone();
        let cron = PoolCron::new(pool.clone(), supervisor.clone(), leadership.leader.clone())
            .on_success(Arc::new(move |job| m.ticked(job)));
        let (mut destinations, mut all_controls, mut wakes) = (Vec::new(), Vec::new(), Vec::new());
        for outlet in outlets {
            let figures = metrics.destination(outlet.destination.as_str());
            let guard = Arc::new(SinkGuard::new(
                outlet.sink,
                outlet.protection,
                Arc::new(SystemClock),
                figures.clone(),
            ));
            let controls = Arc::new(Controls::new(
                outlet.destination.clone(),
                guard,
                config.service.batch_size,
            ));
            // Snapshots (1C) go out from job rows; event streams from the
            // log, where saves and the saga append them.
            match outlet.policy {
                DeliveryPolicy::LatestWins => DeliveryEngine::new(
                    store.clone(),
                    outlet.policy,
                    controls.clone(),
                    config.service.clone(),
                    figures,
                )
                .register(&cron),
                DeliveryPolicy::EveryMessageInOrder => crate::LogEngine::new(
                    store.clone(),
                    controls.clone(),
                    config.service.clone(),
                    figures,
                )
                .register(&cron),
            }
            wakes.push(controls.wake());
            all_controls.push(controls);
            destinations.push(outlet.destination);
        }
        let (backlog_tx, backlog) = tokio::sync::watch::channel(None);
        Upkeep::new(
            store.clone(),
            destinations,
            config.service,
            metrics.clone(),
            wakes.clone(),
            backlog_tx,
        )
        .register(&cron);
        let listen = worker::wakeup::listen(
            store.pool().clone(),
            store::NOTIFY_CHANNEL,
            wakes,
            supervisor.shutdown().clone(),
        );
        supervisor.spawn("listen", async move {
            listen.await;
            Ok::<(), std::convert::Infallible>(())
        });
        if let Some(election) = leadership.election {
            supervisor.spawn("election", election);
        }
        Self {
            inner: Arc::new(Inner {
                store,
                cron,
                leader: leadership.leader,
                controls: all_controls,
                pool,
                supervisor,
                metrics,
                backlog,
            }),
        }
    }

    /// Waits for shutdown, then for every run in flight: sent deliveries are
    /// awaited and recorded, unsent ones released. An error names the
    /// long-running task whose death stopped the relay.
    pub async fn stopped(&self) -> Result<(), TaskDied> {
        let result = self.inner.supervisor.wait().await;
        self.inner.pool.shutdown().await;
        result
    }

    /// Runs `job` on this relay's workers, under its supervisor and (for
    /// [`Scope::Leader`](worker::Scope::Leader)) its leader, e.g. the saga's
    /// deadline scan.
    pub fn schedule(&self, job: worker::Job) {
        self.inner.cron.schedule(job);
    }

    /// Runs `task` until shutdown under this relay's supervisor: its end
    /// before shutdown, or its error, stops the relay.
    pub fn spawn<E>(
        &self,
        name: &'static str,
        task: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.inner.supervisor.spawn(name, task);
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.inner.metrics
    }

    /// The live settings of each destination, in the order of the outlets.
    pub fn controls(&self) -> &[Arc<Controls>] {
        &self.inner.controls
    }

    /// The database it delivers from.
    pub fn store(&self) -> Store {
        self.inner.store.clone()
    }

    /// Who leads.
    pub fn leader(&self) -> Arc<dyn Leader> {
        self.inner.leader.clone()
    }

    /// The leader's latest recount of every destination's backlog: `None`
    /// until this relay has led through one.
    pub fn backlog(&self) -> tokio::sync::watch::Receiver<Option<Arc<store::Backlog>>> {
        self.inner.backlog.clone()
    }

    /// When shutdown begins.
    pub fn shutdown(&self) -> CancellationToken {
        self.inner.supervisor.shutdown().clone()
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
    for controls in &i.controls {
        controls.guard().report_breaker();
    }
    i.metrics.workers_busy.set(i.pool.busy() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        i.metrics.render(i.leader.is_leader()),
    )
}

//! The leader's jobs over the whole outbox, whatever the destination:
//! rescuing expired claims, deleting finished rows past retention,
//! recounting each destination's backlog, and truncating the log's
//! segments every cursor has passed.

use std::sync::Arc;
use std::time::Duration;

use domain::Destination;
use futures::future::BoxFuture;
use store::{Backlog, Store};
use tokio::sync::{watch, Notify};
use worker::{Cron, Job, JobError, Progress, Scope};

use crate::engine::ServiceConfig;
use crate::metrics::RelayMetrics;
use crate::Result;

/// The leader-only upkeep of the outbox.
pub struct Upkeep {
    store: Store,
    destinations: Vec<Destination>,
    config: ServiceConfig,
    metrics: Arc<RelayMetrics>,
    /// Woken after a rescue, so the rescued tasks go out at once.
    wake: Vec<Arc<Notify>>,
    /// Where each recount goes, for the `OutboxRelay` status.
    published: watch::Sender<Option<Arc<Backlog>>>,
}

impl Upkeep {
    /// Upkeep of the outbox; backlog figures for `destinations`, sent to
    /// `published` too, and `wake` notified when rescued tasks are due
    /// again.
    pub fn new(
        store: Store,
        destinations: Vec<Destination>,
        config: ServiceConfig,
        metrics: Arc<RelayMetrics>,
        wake: Vec<Arc<Notify>>,
        published: watch::Sender<Option<Arc<Backlog>>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            destinations,
            config,
            metrics,
            wake,
            published,
        })
    }

    /// Registers `rescue` (expired claims), `retention` (old finished rows)
    /// and `backlog` (the figures), each on the leader only.
    pub fn register(self: &Arc<Self>, cron: &dyn Cron) {
        type Run = fn(Arc<Upkeep>) -> BoxFuture<'static, Result<Progress>>;
        let c = &self.config;
        let jobs: [(&'static str, Duration, Run); 4] = [
            ("rescue", c.rescue_interval, |u| {
                Box::pin(async move { u.rescue_expired().await })
            }),
            ("retention", c.retention_interval, |u| {
                Box::pin(async move { u.delete_finished().await })
            }),
            ("backlog", c.backlog_interval, |u| {
                Box::pin(async move { u.refresh_backlog().await })
            }),
            ("log rotation", c.retention_interval, |u| {
                Box::pin(async move { u.rotate_log().await })
            }),
        ];
        for (name, every, run) in jobs {
            let upkeep = self.clone();
            cron.schedule(Job {
                name,
                scope: Scope::Leader,
                every,
                parallelism: 1,
                wake: None,
                run: Arc::new(move |_| {
                    let run = run(upkeep.clone());
                    Box::pin(async move { run.await.map_err(JobError::from) })
                }),
            });
        }
    }

    /// Truncates the log's segments every cursor has passed.
    pub async fn rotate_log(&self) -> Result<Progress> {
        let truncated = self.store.rotate_log().await?;
        if !truncated.is_empty() {
            tracing::info!(?truncated, "log segments every cursor passed are truncated");
        }
        Ok(Progress::Idle)
    }

    /// Returns expired claims to `pending`.
    pub async fn rescue_expired(&self) -> Result<Progress> {
        const BATCH: u32 = 500;
        let rescued = self.store.rescue_expired(BATCH).await?;
        if !rescued.is_empty() {
            tracing::warn!(rescued = rescued.len(), "rescued tasks whose claim expired");
            for wake in &self.wake {
                wake.notify_one();
            }
        }
        Ok(more_if(rescued.len() == BATCH as usize))
    }

    /// Deletes finished tasks past retention, in small batches.
    pub async fn delete_finished(&self) -> Result<Progress> {
        const BATCH: u32 = 1000;
        let c = &self.config;
        let deleted = self
            .store
            .delete_finished(c.retention, c.idempotency_key_ttl, c.inbox_retention, BATCH)
            .await?;
        Ok(more_if(deleted == u64::from(BATCH)))
    }

    /// Recounts each destination's backlog (for an event stream, its
    /// cursors' lag) for the API and the metrics.
    pub async fn refresh_backlog(&self) -> Result<Progress> {
        let backlog = self.store.refresh_backlog(&self.destinations).await?;
        for stats in &backlog.destinations {
            self.metrics.backlog(stats);
        }
        for cursor in &backlog.cursors {
            self.metrics.cursor(cursor);
        }
        self.published.send_replace(Some(Arc::new(backlog)));
        Ok(Progress::Idle)
    }
}

fn more_if(full: bool) -> Progress {
    if full {
        Progress::MoreWork
    } else {
        Progress::Idle
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use worker::{Backoff, MockCron};

    pub(crate) fn config() -> ServiceConfig {
        let second = Duration::from_secs(1);
        ServiceConfig {
            relay_id: "r".into(),
            batch_size: 10,
            claim_lanes: 3,
            lease: second,
            max_attempts: 5,
            backoff: Backoff {
                base: second,
                max: second,
            },
            poll_interval: Duration::from_millis(500),
            rescue_interval: Duration::from_secs(7),
            retention: Duration::from_secs(86_400),
            idempotency_key_ttl: Duration::from_secs(86_400),
            inbox_retention: Duration::from_secs(86_400),
            retention_interval: Duration::from_secs(60),
            backlog_interval: Duration::from_secs(5),
            in_doubt: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn upkeep_registers_its_leader_jobs_through_the_injected_cron() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/none")
            .unwrap();
        let upkeep = Upkeep::new(
            Store::new(pool),
            vec![Destination::onec()],
            config(),
            Arc::default(),
            Vec::new(),
            watch::Sender::new(None),
        );
        let mut cron = MockCron::new();
        let mut seq = mockall::Sequence::new();
        for (name, every) in [
            ("rescue", Duration::from_secs(7)),
            ("retention", Duration::from_secs(60)),
            ("backlog", Duration::from_secs(5)),
            ("log rotation", Duration::from_secs(60)),
        ] {
            cron.expect_schedule()
                .withf(move |job| {
                    job.name == name
                        && job.scope == Scope::Leader
                        && job.parallelism == 1
                        && job.every == every
                        && job.wake.is_none()
                })
                .times(1)
                .in_sequence(&mut seq)
                .return_const(());
        }

        upkeep.register(&cron);
    }
}

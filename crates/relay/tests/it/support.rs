use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::{DeliveryPolicy, Destination};
use onec::{Credentials, HttpOnecClient, OnecClient, OnecConfig};
use onec_mock::{Faults, MockConfig, MockState};
use relay::{Leadership, Outlet, ProtectionConfig, Relay, RelayConfig, ServiceConfig};
use sqlx::PgPool;
use store::Store;
use tokio_util::sync::CancellationToken;
use worker::{Backoff, BreakerConfig};

/// A relay delivering to 1C alone, with these settings.
#[derive(Clone)]
pub struct OnecRelayConfig {
    pub service: ServiceConfig,
    pub protection: ProtectionConfig,
}

pub fn config() -> OnecRelayConfig {
    OnecRelayConfig {
        service: ServiceConfig {
            relay_id: "test-relay".into(),
            batch_size: 50,
            claim_lanes: 2,
            lease: Duration::from_secs(30),
            max_attempts: 5,
            backoff: Backoff {
                base: Duration::from_millis(20),
                max: Duration::from_millis(100),
            },
            poll_interval: Duration::from_secs(60),
            rescue_interval: Duration::from_secs(60),
            retention: Duration::from_secs(86_400),
            idempotency_key_ttl: Duration::from_secs(86_400),
            inbox_retention: Duration::from_secs(86_400),
            retention_interval: Duration::from_secs(60),
            backlog_interval: Duration::from_secs(60),
            in_doubt: Duration::from_secs(30),
        },
        protection: ProtectionConfig {
            max_in_flight: 16,
            rate_per_second: None,
            breaker: BreakerConfig {
                failure_threshold: 1000,
                cool_down: Duration::from_secs(60),
            },
        },
    }
}

pub struct RunningRelay {
    pub relay: Relay,
    pub shutdown: CancellationToken,
}

impl RunningRelay {
    pub fn start(pool: &PgPool, client: Arc<dyn OnecClient>, config: OnecRelayConfig) -> Self {
        Self::start_with(pool, client, config, Leadership::always())
    }

    pub fn start_with(
        pool: &PgPool,
        client: Arc<dyn OnecClient>,
        config: OnecRelayConfig,
        leadership: Leadership,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let relay = Relay::start(
            Store::new(pool.clone()),
            vec![Outlet {
                destination: Destination::onec(),
                policy: DeliveryPolicy::LatestWins,
                sink: Arc::new(onec::OnecSink::new(client)),
                protection: config.protection,
            }],
            RelayConfig {
                service: config.service,
            },
            leadership,
            shutdown.clone(),
        );
        Self { relay, shutdown }
    }

    pub async fn stop(self) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.relay.stopped())
            .await
            .expect("the relay stops in time")
            .expect("no task of the relay died");
        started.elapsed()
    }
}

pub struct InProcessMock {
    pub state: MockState,
    pub client: Arc<dyn OnecClient>,
}

pub async fn mock_1c(faults: Faults) -> InProcessMock {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let config = MockConfig {
        username: "u".into(),
        password: "p".into(),
        faults,
    };
    let (state, _) = onec_mock::spawn(listener, config, std::future::pending()).unwrap();
    let client = HttpOnecClient::new(&OnecConfig {
        base_url: format!("http://{addr}"),
        credentials: Credentials {
            username: "u".into(),
            password: "p".into(),
        },
        timeout: Duration::from_secs(5),
        max_idle_connections: 32,
    })
    .unwrap();
    InProcessMock {
        state,
        client: Arc::new(client),
    }
}

/// Inserts a task the mock accepts, without waking anyone.
pub async fn insert_task(pool: &PgPool, order: &str, version: i64) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload)
         VALUES (gen_random_uuid(), 'onec', 'order', 'order.updated', $1, $2, jsonb_build_object('order', jsonb_build_object('id', $1::text)))
         RETURNING id",
    )
    .bind(order)
    .bind(version)
    .fetch_one(pool)
    .await
    .unwrap()
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Polls `check` until it holds or `within` passes; returns the time taken.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

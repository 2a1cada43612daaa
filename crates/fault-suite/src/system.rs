//! The system under test: a throwaway PostgreSQL cluster, the built
//! `onec-mock`, one `api` and three `relay` processes electing a leader
//! through PostgreSQL, all on loopback.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ephemeral_pg::EphemeralPostgres;
use serde_json::Value;
use sqlx::PgPool;
use testkit::process::{spawn, Proc};

/// Secrets of the run; the logs must never contain them.
pub const ONEC_PASSWORD: &str = "fault-suite-1c-password-7b1f";
pub const API_TOKEN: &str = "fault-suite-api-token-c42d";

pub const RELAYS: usize = 3;

/// Relay settings every scenario shares. The claim lease is short so a
/// killed relay's claims are rescued within seconds; the attempt budget
/// (20 attempts, backoff up to 10 s) spans minutes, longer than any outage
/// here, so an outage alone cannot kill a task.
pub(crate) const RELAY_ENV: &[(&str, &str)] = &[
    ("LEADER_ELECTION", "postgres"),
    ("LEASE_DURATION", "3s"),
    ("LEASE_RENEW_DEADLINE", "2s"),
    ("LEASE_RETRY_PERIOD", "500ms"),
    ("RELAY_CLAIM_LEASE", "5s"),
    ("RELAY_RESCUE_INTERVAL", "1s"),
    ("RELAY_POLL_INTERVAL", "5s"),
    ("RELAY_BATCH_SIZE", "100"),
    ("RELAY_MAX_ATTEMPTS", "20"),
    ("RELAY_BACKOFF_BASE", "200ms"),
    ("RELAY_BACKOFF_MAX", "10s"),
    ("ONEC_TIMEOUT", "1s"),
    // 1C (the mock) finishes a timed-out request at most 0.5 s later here.
    ("ONEC_IN_DOUBT", "3s"),
    ("ONEC_BREAKER_FAILURES", "5"),
    ("ONEC_BREAKER_COOL_DOWN", "2s"),
    ("LISTEN_ADDR", "127.0.0.1:0"),
    ("RUST_LOG", VERBOSE),
];

/// Debug logs of our own crates, so the secret scan covers every path that
/// logs, not just the quiet ones.
const VERBOSE: &str = "debug,sqlx=warn,hyper=warn,hyper_util=warn,h2=warn,reqwest=warn,tower=warn";

pub struct System {
    pub pg: EphemeralPostgres,
    pub db_url: String,
    pub pool: PgPool,
    pub mock: Proc,
    pub api: Proc,
    relays: Vec<Option<Proc>>,
    /// Overrides of [`RELAY_ENV`] for relays started from now on.
    relay_overrides: Vec<(String, String)>,
    pub logs: PathBuf,
    pub http: reqwest::Client,
}

/// Where every outcome of the outbox stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: i64,
    pub running: i64,
    pub dead: i64,
}

impl System {
    pub async fn start() -> Result<Self> {
        let logs = testkit::target_tmp().join("fault-suite");
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs)?;
        let pg = tokio::task::spawn_blocking(|| {
            EphemeralPostgres::start(&ephemeral_pg::Options {
                parent_dir: testkit::target_tmp(),
                ..Default::default()
            })
        })
        .await??;
        let db_url = pg.url();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_lazy(&db_url)?;

        let mock = spawn(
            "onec-mock",
            &["--listen", "127.0.0.1:0"],
            &[
                ("ONEC_USERNAME", "orders-center"),
                ("ONEC_PASSWORD", ONEC_PASSWORD),
                ("RUST_LOG", VERBOSE),
            ],
            "onec-mock listening",
            &logs.join("onec-mock.log"),
        )
        .await?;
        let api = spawn_api(&db_url, &[], &logs).await?;
        let mut system = Self {
            pg,
            db_url,
            pool,
            mock,
            api,
            relays: (0..RELAYS).map(|_| None).collect(),
            relay_overrides: Vec::new(),
            logs,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .timeout(Duration::from_secs(30))
                .build()?,
        };
        for i in 0..RELAYS {
            system.start_relay(i).await?;
        }
        system.wait_for_leader(Duration::from_secs(15)).await?;
        Ok(system)
    }

    /// Stops the API (SIGTERM) and starts it again with `env` added.
    pub async fn restart_api_with(&mut self, env: &[(&str, &str)]) -> Result<()> {
        let fresh = spawn_api(&self.db_url, env, &self.logs).await?;
        let old = std::mem::replace(&mut self.api, fresh);
        old.stop().await?;
        Ok(())
    }

    /// Relays started from now on use `key=value` instead of the default.
    pub fn set_relay_env(&mut self, key: &str, value: &str) {
        self.relay_overrides.retain(|(k, _)| k != key);
        self.relay_overrides.push((key.into(), value.into()));
    }

    pub async fn start_relay(&mut self, i: usize) -> Result<()> {
        ensure!(self.relays[i].is_none(), "relay {i} already runs");
        let name = relay_name(i);
        let mut env: HashMap<&str, &str> = RELAY_ENV.iter().copied().collect();
        for (k, v) in &self.relay_overrides {
            env.insert(k, v);
        }
        env.insert("DATABASE_URL", &self.db_url);
        env.insert("ONEC_URL", &self.mock.url);
        env.insert("ONEC_USERNAME", "orders-center");
        env.insert("ONEC_PASSWORD", ONEC_PASSWORD);
        env.insert("POD_NAME", &name);
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let proc = spawn(
            "orders-center",
            &["relay"],
            &env,
            "relay started",
            &self.logs.join(format!("{name}.log")),
        )
        .await?;
        self.relays[i] = Some(proc);
        Ok(())
    }

    /// Relays started from now on use the default of each of `keys` again.
    pub fn clear_relay_env(&mut self, keys: &[&str]) {
        self.relay_overrides
            .retain(|(k, _)| !keys.contains(&k.as_str()));
    }

    /// Stops every relay (SIGTERM), applies `env` to relays started from
    /// now on, and starts them all again.
    pub async fn restart_relays_with(&mut self, env: &[(&str, &str)]) -> Result<()> {
        for i in 0..RELAYS {
            self.stop_relay(i).await?;
        }
        for (key, value) in env {
            self.set_relay_env(key, value);
        }
        for i in 0..RELAYS {
            self.start_relay(i).await?;
        }
        Ok(())
    }

    pub async fn kill_relay(&mut self, i: usize) -> Result<()> {
        let proc = self.relays[i].take().context("relay not running")?;
        proc.kill().await
    }

    /// SIGTERM; returns how long the relay took to stop.
    pub async fn stop_relay(&mut self, i: usize) -> Result<Duration> {
        let proc = self.relays[i].take().context("relay not running")?;
        proc.stop().await
    }

    pub fn relay_urls(&self) -> Vec<String> {
        self.relays
            .iter()
            .flatten()
            .map(|p| p.url.clone())
            .collect()
    }

    /// The index of the relay holding the PostgreSQL lease, if any.
    pub async fn leader(&self) -> Result<Option<usize>> {
        let holder: Option<String> =
            sqlx::query_scalar("SELECT holder FROM leader_leases WHERE expires_at > now() LIMIT 1")
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        Ok(holder.and_then(|h| (0..RELAYS).find(|&i| relay_name(i) == h)))
    }

    pub async fn wait_for_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.leader().await? {
                return Ok(i);
            }
            ensure!(Instant::now() < deadline, "no leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn backlog(&self) -> Result<Backlog> {
        let (pending, running, dead) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state = 'running'),
                    count(*) FILTER (WHERE state = 'dead')
             FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Backlog {
            pending,
            running,
            dead,
        })
    }

    /// Waits until nothing is pending or running; returns how long it took.
    pub async fn drained(&self, within: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let b = self.backlog().await?;
            if b.pending == 0 && b.running == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                // Every version of the orders left behind, to tell why.
                let stuck: Vec<(String, i64, String, String, Option<String>)> = sqlx::query_as(
                    "SELECT aggregateid, version, state,
                            format($$run_at %s, attempts %s, in doubt until %s, updated %s, now %s$$,
                                   run_at, attempts, in_doubt_until, updated_at, now()),
                            last_error
                     FROM outbox WHERE aggregateid IN (
                         SELECT aggregateid FROM outbox
                         WHERE state IN ('pending', 'running') LIMIT 5)
                     ORDER BY aggregateid, version",
                )
                .fetch_all(&self.pool)
                .await?;
                bail!("backlog not drained within {within:?}: {b:?}; {stuck:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn mock_stats(&self) -> Result<Value> {
        self.get_json(&format!("{}/stats", self.mock.url)).await
    }

    /// The version 1C holds per order.
    pub async fn mock_versions(&self) -> Result<HashMap<String, i64>> {
        let v = self
            .get_json(&format!("{}/admin/orders", self.mock.url))
            .await?;
        Ok(serde_json::from_value(v)?)
    }

    pub async fn set_faults(&self, faults: Value) -> Result<()> {
        let res = self
            .http
            .put(format!("{}/admin/faults", self.mock.url))
            .json(&faults)
            .send()
            .await?;
        ensure!(res.status() == 200, "setting faults: {}", res.status());
        Ok(())
    }

    /// The highest value of `metric` over the running relays' /metrics.
    /// The largest value of series `metric` carrying every one of `labels`
    /// (e.g. `class="timeout"`) over the relays' expositions.
    pub async fn relay_metric_max(&self, metric: &str, labels: &[&str]) -> Result<f64> {
        let mut max = 0f64;
        for url in self.relay_urls() {
            let Ok(res) = self.http.get(format!("{url}/metrics")).send().await else {
                continue;
            };
            let text = res.text().await?;
            let series = text.lines().filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
                    && labels.iter().all(|label| l.contains(label))
            });
            for line in series {
                if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    max = max.max(v);
                }
            }
        }
        Ok(max)
    }

    async fn get_json(&self, url: &str) -> Result<Value> {
        let res = self.http.get(url).send().await?;
        ensure!(res.status() == 200, "GET {url}: {}", res.status());
        Ok(res.json().await?)
    }

    /// Stops every process (SIGTERM) and then the cluster.
    pub async fn shut_down(mut self) -> Result<()> {
        for i in 0..RELAYS {
            if self.relays[i].is_some() {
                self.stop_relay(i).await?;
            }
        }
        self.api.stop().await?;
        self.mock.stop().await?;
        self.pool.close().await;
        tokio::task::spawn_blocking(move || self.pg.stop()).await??;
        Ok(())
    }
}

async fn spawn_api(db_url: &str, extra: &[(&str, &str)], logs: &std::path::Path) -> Result<Proc> {
    let mut env = vec![
        ("DATABASE_URL", db_url),
        ("API_TOKENS", API_TOKEN),
        ("REQUEST_TIMEOUT", "10s"),
        ("RUST_LOG", VERBOSE),
    ];
    env.extend_from_slice(extra);
    spawn(
        "orders-center",
        &["api", "--listen", "127.0.0.1:0", "--migrate"],
        &env,
        "api listening",
        &logs.join("api.log"),
    )
    .await
}

pub fn relay_name(i: usize) -> String {
    format!("relay-{i}")
}

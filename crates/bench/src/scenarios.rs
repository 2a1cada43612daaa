//! The measured scenarios. Each asserts its correctness before reporting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use async_trait::async_trait;
use domain::DeliveryPolicy;
use relay::{Leadership, Outlet, ProtectionConfig, Relay, RelayConfig, ServiceConfig};
use sink::{Message, Sink};
use sqlx::PgPool;
use store::claim_sql;
use store::Store;
use tokio_util::sync::CancellationToken;
use worker::{Backoff, BreakerConfig};

use crate::{Figure, Scenario, Sizes};
use testkit::process::{self as process, Proc};

/// A destination that takes every message at once: a drain into it
/// measures the relay and the database alone.
struct NoopSink;

#[async_trait]
impl Sink for NoopSink {
    async fn deliver(&self, _: &Message) -> sink::Outcome {
        Ok(())
    }
}

/// The destination of the no-op drains.
const NOOP: &str = "bench";

/// Claims per query and claim lanes of the drains (the relay's defaults).
const BATCH: u32 = 500;
const LANES: usize = 3;

pub(crate) fn relay_config(batch: u32, lanes: usize) -> RelayConfig {
    RelayConfig {
        service: ServiceConfig {
            relay_id: "bench".into(),
            batch_size: batch,
            claim_lanes: lanes,
            lease: Duration::from_secs(120),
            max_attempts: 12,
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_secs(1),
            },
            poll_interval: Duration::from_millis(100),
            rescue_interval: Duration::from_secs(60),
            retention: Duration::from_secs(86_400),
            idempotency_key_ttl: Duration::from_secs(86_400),
            inbox_retention: Duration::from_secs(86_400),
            retention_interval: Duration::from_secs(3600),
            backlog_interval: Duration::from_secs(3600),
            in_doubt: Duration::from_secs(30),
        },
    }
}

fn noop_outlet(policy: DeliveryPolicy) -> Outlet {
    Outlet {
        destination: NOOP.parse().expect("a destination name"),
        policy,
        sink: Arc::new(NoopSink),
        protection: ProtectionConfig {
            max_in_flight: 10_000,
            rate_per_second: None,
            breaker: BreakerConfig {
                failure_threshold: 1000,
                cool_down: Duration::from_secs(1),
            },
        },
    }
}

/// What a drain starts from: `orders` orders with one pending message
/// each, or with `bursts`, every tenth order with five.
#[derive(Debug, Clone, Copy)]
struct Backlog {
    orders: i64,
    bursts: bool,
}

impl Backlog {
    fn rows(self) -> i64 {
        if self.bursts {
            self.orders + self.orders / 10 * 4
        } else {
            self.orders
        }
    }
}

/// Queues `backlog` for `destination`, order ids starting with `prefix`;
/// each message is a version of its order, in version order.
async fn prefill(pool: &PgPool, destination: &str, prefix: &str, backlog: Backlog) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version,
                             payload)
         SELECT gen_random_uuid(), $1, 'order', 'order.updated', $2 || g, v,
                jsonb_build_object('order', jsonb_build_object('id', $2 || g))
         FROM generate_series(1, $3) g
         CROSS JOIN LATERAL generate_series(1, CASE WHEN $4 AND g % 10 = 0 THEN 5 ELSE 1 END) v",
    )
    .bind(destination)
    .bind(prefix)
    .bind(backlog.orders)
    .bind(backlog.bursts)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE outbox").execute(pool).await?;
    Ok(())
}

async fn count(pool: &PgPool, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

pub(crate) fn figure(
    scenario: &str,
    metric: &str,
    value: f64,
    unit: &'static str,
    target: Option<(&str, bool)>,
) -> Figure {
    Figure {
        scenario: scenario.into(),
        metric: metric.into(),
        value,
        unit,
        target: target.map(|(t, _)| t.to_owned()),
        met: target.map(|(_, met)| met),
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub async fn run_all(
    sizes: &Sizes,
    quick: bool,
    only: impl Fn(Scenario) -> bool,
    out: &mut Vec<Figure>,
) -> Result<()> {
    if only(Scenario::Noop) {
        for &orders in &sizes.noop_backlogs {
            let backlog = Backlog {
                orders,
                bursts: false,
            };
            let drain = drain_noop(backlog, DeliveryPolicy::LatestWins, 0, false).await?;
            let scenario = "1 drain, no-op sink";
            let full = !quick && orders >= 100_000;
            out.push(figure(
                scenario,
                &format!("{orders} tasks drained"),
                drain.rate,
                "task/s",
                full.then_some(("≥ 43000", drain.rate >= 43_000.0)),
            ));
            drain.push_ceiling(scenario, orders, out);
            let simplest = simplest_claim_ceiling(orders).await?;
            out.push(figure(
                scenario,
                "simplest claim ceiling (pgbench: PK, partial index, 500 SKIP LOCKED, c=3)",
                simplest,
                "task/s",
                None,
            ));
            out.push(figure(
                scenario,
                "drain / simplest claim ceiling",
                drain.rate / simplest,
                "×",
                full.then_some(("≥ 0.7", drain.rate / simplest >= 0.7)),
            ));
            out.push(figure(
                scenario,
                "rows claimed per claim query",
                drain.per_claim,
                "rows",
                None,
            ));
        }
    }
    if only(Scenario::InOrder) {
        in_order(sizes.in_order_orders, quick, out).await?;
    }
    if only(Scenario::Http) {
        drain_http(sizes.http_tasks, 0, quick, out).await?;
        drain_http(sizes.http_tasks, 20, quick, out).await?;
    }
    if only(Scenario::Latency) {
        for rate in sizes.rates {
            latency(rate, sizes.latency_seconds, 0, quick, out).await?;
        }
    }
    if only(Scenario::Held) {
        let rate = sizes.rates[0];
        latency(rate, sizes.latency_seconds, 1000, quick, out).await?;
    }
    if only(Scenario::Api) {
        api_throughput(sizes.api_seconds, quick, out).await?;
    }
    if only(Scenario::Flat) {
        flat_cost(sizes, quick, out).await?;
    }
    if only(Scenario::Kafka) {
        crate::brokers::run_all(crate::brokers::Broker::kafka().await?, sizes, quick, out).await?;
    }
    if only(Scenario::Rabbitmq) {
        let broker = crate::brokers::Broker::rabbitmq().await?;
        crate::brokers::run_all(broker, sizes, quick, out).await?;
    }
    if only(Scenario::Log) {
        let (small, large) = sizes.log_backlogs;
        crate::log::run(small, large, quick, out).await?;
        let mut postgres = crate::brokers::Broker::Postgres;
        crate::brokers::latency(
            &mut postgres,
            sizes.rates[0],
            sizes.latency_seconds,
            quick,
            out,
        )
        .await?;
    }
    if only(Scenario::Cache) {
        crate::cache::run(quick, out).await?;
    }
    if only(Scenario::Ingest) {
        for kafka in [true, false] {
            let mut broker = if kafka {
                crate::brokers::Broker::kafka().await?
            } else {
                crate::brokers::Broker::rabbitmq().await?
            };
            crate::ingest::run(&mut broker, quick, out).await?;
            tokio::task::spawn_blocking(move || broker.stop()).await?;
        }
    }
    if only(Scenario::Saga) {
        for over in &sizes.saga_over {
            let mut broker = match over {
                crate::SagaOver::Kafka => Some(crate::brokers::Broker::kafka().await?),
                crate::SagaOver::Rabbitmq => Some(crate::brokers::Broker::rabbitmq().await?),
                crate::SagaOver::Postgresql => None,
            };
            crate::saga::run(broker.as_mut(), quick, sizes.latency_seconds, out).await?;
            if let Some(broker) = broker {
                tokio::task::spawn_blocking(move || broker.stop()).await?;
            }
        }
    }
    Ok(())
}

/// What one drain measured.
struct Drain {
    /// Tasks settled (delivered or superseded) per second.
    rate: f64,
    /// The same run's SQL-only ceiling: pgbench running the claim and
    /// complete statements on an equal backlog, same batch and concurrency.
    ceiling: f64,
    /// Tasks per non-empty claim.
    per_claim: f64,
    /// Mean latency of a claim of 100, after the drain.
    claim_ms: f64,
}

impl Drain {
    fn push_ceiling(&self, scenario: &str, rows: i64, out: &mut Vec<Figure>) {
        push_ceiling(scenario, rows, self.rate, self.ceiling, out);
    }
}

/// Prints a drain's SQL-only ceiling and how close the relay came to it.
fn push_ceiling(scenario: &str, rows: i64, rate: f64, ceiling: f64, out: &mut Vec<Figure>) {
    out.push(figure(
        scenario,
        &format!("{rows} tasks, pgbench ceiling"),
        ceiling,
        "task/s",
        None,
    ));
    out.push(figure(
        scenario,
        "relay / ceiling",
        rate / ceiling * 100.0,
        "%",
        None,
    ));
}

/// Drains `backlog` through an in-process relay into a no-op sink under
/// `policy`, over a table that also holds `finished` done rows, optionally
/// while another session holds a snapshot open; then measures pgbench on an
/// equal backlog under the same conditions.
async fn drain_noop(
    backlog: Backlog,
    policy: DeliveryPolicy,
    finished: i64,
    hold_snapshot: bool,
) -> Result<Drain> {
    let db = testkit::database().await;
    if finished > 0 {
        sqlx::query(
            "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version,
                                 payload, state, finished_at)
             SELECT gen_random_uuid(), $2, 'order', 'order.updated', 'F-' || g, 1, '{}', 'done',
                    now()
             FROM generate_series(1, $1) g",
        )
        .bind(finished)
        .bind(NOOP)
        .execute(&db.pool)
        .await?;
    }
    prefill(&db.pool, NOOP, "N-", backlog).await?;
    let mut holder = None;
    if hold_snapshot {
        // A long transaction pins the xmin horizon: no row version it might
        // see can be vacuumed while the drain runs.
        let mut conn = db.pool.acquire().await?.detach();
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut conn)
            .await?;
        sqlx::query("SELECT count(*) FROM outbox")
            .execute(&mut conn)
            .await?;
        holder = Some(conn);
    }
    let rows = backlog.rows();
    let shutdown = CancellationToken::new();
    let relay = Relay::start(
        Store::new(db.pool.clone()),
        vec![noop_outlet(policy)],
        relay_config(BATCH, LANES),
        Leadership::always(),
        shutdown.clone(),
    );
    let settled = |relay: &Relay| {
        (relay.metrics().delivered_total(NOOP) + relay.metrics().superseded_total(NOOP)) as i64
    };
    // The relay counts a delivery only once its completion has committed.
    let started = Instant::now();
    while settled(&relay) < rows {
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "drain did not finish"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    relay.stopped().await?;

    let (done, superseded): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'done'),
                count(*) FILTER (WHERE state = 'superseded')
         FROM outbox WHERE aggregateid LIKE 'N-%'",
    )
    .fetch_one(&db.pool)
    .await?;
    ensure!(
        done + superseded == rows,
        "{done} + {superseded} of {rows} tasks settled"
    );
    ensure!(
        relay.metrics().delivered_total(NOOP) as i64 == done,
        "a task was delivered twice"
    );
    if policy == DeliveryPolicy::EveryMessageInOrder {
        ensure!(superseded == 0, "{superseded} tasks superseded in order");
    }
    let ceiling = pgbench_drain(&db, backlog, policy).await?;
    drop(holder);
    Ok(Drain {
        rate: rows as f64 / took.as_secs_f64(),
        ceiling,
        per_claim: done as f64 / (relay.metrics().claims(NOOP) as f64).max(1.0),
        claim_ms: claim_latency_ms(&db.pool).await?,
    })
}

/// The claim and complete statements of the relay as pgbench runs them:
/// the store's own SQL, with pgbench variables for the parameters and the
/// claimed rows folded into arrays for the completion.
fn pgbench_drain_script(policy: DeliveryPolicy) -> String {
    let bind = |sql: &str, names: &[&str]| {
        // Highest first, so $1 never eats the start of $10.
        names
            .iter()
            .enumerate()
            .rev()
            .fold(sql.to_owned(), |sql, (i, name)| {
                sql.replace(&format!("${}", i + 1), &format!(":{name}"))
            })
    };
    let candidates = bind(claim_sql::candidates(policy), &["batch", "dest"]);
    let claim = bind(
        claim_sql::claim(policy),
        &["keys", "claimant", "lease", "dest"],
    );
    let tail = claim
        .rfind("SELECT (SELECT count(*) FROM superseded)")
        .expect("the claim ends in its result select");
    let claim = format!(
        "{} SELECT (SELECT count(*) FROM superseded) AS superseded,
                 coalesce(array_agg(c.id) FILTER (WHERE NOT c.via_head), '{{}}') AS ids,
                 coalesce(array_agg(c.claim_token) FILTER (WHERE NOT c.via_head), '{{}}')
                     AS tokens,
                 coalesce(array_agg(c.id) FILTER (WHERE c.via_head), '{{}}') AS tails
          FROM claims c",
        &claim[..tail]
    );
    let complete = bind(claim_sql::COMPLETE.as_str(), &["ids", "tokens", "tails"]);
    // pgbench reads a command per line: drop the comments, then the breaks.
    let one_line = |sql: &str| {
        sql.lines()
            .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
            .flat_map(str::split_whitespace)
            .collect::<Vec<_>>()
            .join(" ")
    };
    [
        "BEGIN;".to_owned(),
        format!(
            "SELECT coalesce(array_agg(DISTINCT key ORDER BY key) FILTER (WHERE mine), '{{}}') \
             AS keys FROM ({}) c \\gset",
            one_line(&candidates)
        ),
        format!("{} \\gset", one_line(&claim)),
        "COMMIT;".to_owned(),
        format!("{};", one_line(&complete)),
    ]
    .join("\n")
        + "\n"
}

/// Drains an equal backlog with pgbench running the relay's statements at
/// the same batch size and concurrency; tasks settled per second.
async fn pgbench_drain(
    db: &testkit::TestDb,
    backlog: Backlog,
    policy: DeliveryPolicy,
) -> Result<f64> {
    prefill(&db.pool, NOOP, "P-", backlog).await?;
    let rows = backlog.rows();
    let args = [
        "-D".to_owned(),
        format!("batch={BATCH}"),
        "-D".to_owned(),
        format!("dest={NOOP}"),
        "-D".to_owned(),
        "claimant=pgbench".to_owned(),
        "-D".to_owned(),
        "lease=120".to_owned(),
    ];
    // EXISTS stops at the first open row: polling must not load the
    // database it measures.
    let open = format!(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE destination = '{NOOP}' AND state = 'pending')
             OR EXISTS (SELECT 1 FROM outbox WHERE state = 'running')"
    );
    let took = pgbench_until_drained(db, &args, &pgbench_drain_script(policy), &open).await?;
    Ok(rows as f64 / took.as_secs_f64())
}

/// Runs `script` with pgbench at the relay's concurrency until `open`
/// (a query answering whether any row is still to be settled) says no;
/// answers how long it took.
async fn pgbench_until_drained(
    db: &testkit::TestDb,
    args: &[String],
    script: &str,
    open: &str,
) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("drain.sql");
    std::fs::write(&path, script)?;
    let started = Instant::now();
    let mut pgbench = tokio::process::Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-c", &LANES.to_string(), "-j", "2"])
        .args(["-T", "900"])
        .args(args)
        .arg("-f")
        .arg(&path)
        .arg(db.url.split('?').next().unwrap_or(&db.url))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("pgbench is installed (postgresql-client)")?;
    loop {
        let still_open: bool = sqlx::query_scalar(open).fetch_one(&db.pool).await?;
        if !still_open {
            break;
        }
        if let Some(status) = pgbench.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = pgbench.stderr.take() {
                use tokio::io::AsyncReadExt as _;
                e.read_to_string(&mut err).await?;
            }
            anyhow::bail!("pgbench stopped ({status}) with tasks still open: {err}");
        }
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "pgbench did not drain"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    pgbench.kill().await?;
    Ok(took)
}

/// The least any claim of job rows can cost here: pgbench on a table of
/// the outbox's shape with only a primary key and a partial index on
/// `(run_at, id) WHERE state = 'pending'`, claiming 500 rows `FOR UPDATE
/// SKIP LOCKED` at concurrency 3 and completing them by id; tasks per
/// second over a backlog of `rows`.
async fn simplest_claim_ceiling(rows: i64) -> Result<f64> {
    let db = testkit::database().await;
    for ddl in [
        "CREATE TABLE simplest (
             id bigserial PRIMARY KEY,
             event_id uuid NOT NULL,
             destination text NOT NULL,
             aggregateid text NOT NULL,
             version bigint NOT NULL,
             payload jsonb NOT NULL,
             state text NOT NULL DEFAULT 'pending',
             run_at timestamptz NOT NULL DEFAULT now(),
             claimed_by text,
             attempts int NOT NULL DEFAULT 0,
             finished_at timestamptz)",
        "CREATE INDEX simplest_pending ON simplest (run_at, id) WHERE state = 'pending'",
    ] {
        sqlx::query(ddl).execute(&db.pool).await?;
    }
    sqlx::query(
        "INSERT INTO simplest (event_id, destination, aggregateid, version, payload)
         SELECT gen_random_uuid(), 'bench', 'S-' || g, 1, '{\"order\": {\"status\": \"new\"}}'
         FROM generate_series(1, $1) g",
    )
    .bind(rows)
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE simplest")
        .execute(&db.pool)
        .await?;
    let script = "BEGIN;\n\
        WITH c AS (UPDATE simplest SET state = 'running', claimed_by = 'pgbench', \
        attempts = attempts + 1 WHERE id IN (SELECT id FROM simplest WHERE state = 'pending' \
        AND run_at <= now() ORDER BY run_at, id LIMIT 500 FOR UPDATE SKIP LOCKED) \
        RETURNING id) SELECT coalesce(array_agg(id), '{}') AS ids FROM c \\gset\n\
        COMMIT;\n\
        UPDATE simplest SET state = 'done', finished_at = now() WHERE id = ANY(:ids);\n";
    let open = "SELECT EXISTS (SELECT 1 FROM simplest WHERE state = 'pending')
                    OR EXISTS (SELECT 1 FROM simplest WHERE state = 'running')";
    let took = pgbench_until_drained(&db, &[], script, open).await?;
    Ok(rows as f64 / took.as_secs_f64())
}

/// "Every message in order" (the event log) against "latest wins" (1C's
/// job rows) on one backlog shape: every tenth order has five messages
/// queued.
async fn in_order(orders: i64, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let backlog = Backlog {
        orders,
        bursts: true,
    };
    let latest = drain_noop(backlog, DeliveryPolicy::LatestWins, 0, false).await?;
    let ordered = drain_log_noop(backlog).await?;
    let rows = backlog.rows();
    let scenario = "1b drain, latest wins (job rows), 10% of orders with 5";
    out.push(figure(
        scenario,
        &format!("{rows} tasks settled"),
        latest.rate,
        "task/s",
        None,
    ));
    latest.push_ceiling(scenario, rows, out);
    out.push(figure(
        "1b drain, every message in order (the log), 10% of orders with 5",
        &format!("{rows} events delivered"),
        ordered,
        "event/s",
        None,
    ));
    let kept = ordered / latest.rate;
    out.push(figure(
        "1b drain, in order / latest wins",
        "drain rate kept",
        kept * 100.0,
        "%",
        (!quick).then_some(("≥ 90", kept >= 0.9)),
    ));
    Ok(())
}

/// Drains `backlog` from the event log through an in-process relay into
/// a no-op sink; events per second.
async fn drain_log_noop(backlog: Backlog) -> Result<f64> {
    let db = testkit::database().await;
    sqlx::query(
        "INSERT INTO event_log (position, segment, destination, partition, event_id,
                                aggregatetype, aggregateid, type, version, payload)
         SELECT e.p, ((e.p / c.segment_size) % c.segments)::smallint, $1,
                (e.g % c.partitions)::smallint, gen_random_uuid(), 'order', 'N-' || e.g,
                'order.updated', e.v, jsonb_build_object('order', jsonb_build_object('id', 'N-' || e.g))
         FROM (SELECT nextval('event_log_position') AS p, g, v
               FROM generate_series(1, $2) g
               CROSS JOIN LATERAL generate_series(1, CASE WHEN $3 AND g % 10 = 0 THEN 5 ELSE 1 END) v
               ORDER BY g, v) e
         CROSS JOIN log_config c",
    )
    .bind(NOOP)
    .bind(backlog.orders)
    .bind(backlog.bursts)
    .execute(&db.pool)
    .await?;
    let rows = backlog.rows();
    let shutdown = CancellationToken::new();
    let relay = Relay::start(
        Store::new(db.pool.clone()),
        vec![noop_outlet(DeliveryPolicy::EveryMessageInOrder)],
        relay_config(BATCH, LANES),
        Leadership::always(),
        shutdown.clone(),
    );
    let started = Instant::now();
    while (relay.metrics().delivered_total(NOOP) as i64) < rows {
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "the log drain did not finish"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    relay.stopped().await?;
    ensure!(
        relay.metrics().delivered_total(NOOP) as i64 == rows,
        "an event was delivered twice"
    );
    Ok(rows as f64 / took.as_secs_f64())
}

/// Mean latency of a claim of 100 tasks over a fresh pending set.
async fn claim_latency_ms(pool: &PgPool) -> Result<f64> {
    prefill(
        pool,
        NOOP,
        "C-",
        Backlog {
            orders: 5_000,
            bursts: false,
        },
    )
    .await?;
    let store = Store::new(pool.clone());
    let destination = NOOP.parse().expect("a destination name");
    let mut total = Duration::ZERO;
    let rounds = 40;
    for _ in 0..rounds {
        let started = Instant::now();
        let claim = store
            .claim_batch(&store::ClaimSpec {
                destination: &destination,
                policy: DeliveryPolicy::LatestWins,
                claimant: "probe",
                limit: 100,
                lease: Duration::from_secs(60),
            })
            .await?;
        total += started.elapsed();
        let claims: Vec<_> = claim.tasks.iter().map(|t| (t.id, t.token)).collect();
        store.complete_many(&claims).await?;
    }
    Ok(total.as_secs_f64() * 1000.0 / f64::from(rounds))
}

/// Where a role process of the bench logs.
fn log_file(role: &str) -> std::path::PathBuf {
    testkit::target_tmp()
        .join("bench")
        .join(format!("{role}.log"))
}

/// A relay process delivering to `onec_url` (user and password `bench`).
async fn spawn_relay(db_url: &str, onec_url: &str, batch: u32) -> Result<Proc> {
    spawn_relay_with(db_url, onec_url, batch, &[], "relay").await
}

/// The same, with `env` added, logging to `<log>.log`.
pub(crate) async fn spawn_relay_with(
    db_url: &str,
    onec_url: &str,
    batch: u32,
    env: &[(&str, &str)],
    log: &str,
) -> Result<Proc> {
    let batch = batch.to_string();
    let mut env = env.to_vec();
    env.extend([("DATABASE_URL", db_url), ("ONEC_PASSWORD", "bench")]);
    process::spawn(
        "orders-center",
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--onec-url",
            onec_url,
            "--onec-username",
            "bench",
            "--batch-size",
            &batch,
            "--claim-lanes",
            "3",
            "--max-in-flight",
            "512",
            "--poll-interval",
            "100ms",
        ],
        &env,
        "relay started",
        &log_file(log),
    )
    .await
}

/// The 1C mock (user and password `bench`), adding `latency_ms` to every
/// answer.
pub(crate) async fn spawn_mock(latency_ms: u64) -> Result<Proc> {
    let latency = format!("{latency_ms}ms");
    process::spawn(
        "onec-mock",
        &[
            "--listen",
            "127.0.0.1:0",
            "--username",
            "bench",
            "--password",
            "bench",
            "--latency",
            &latency,
        ],
        &[],
        "onec-mock listening",
        &log_file("onec-mock"),
    )
    .await
}

/// An API process with a pool of 32 connections.
async fn spawn_api(db_url: &str) -> Result<Proc> {
    spawn_api_with(db_url, &[]).await
}

/// The same, with `env` added.
pub(crate) async fn spawn_api_with(db_url: &str, env: &[(&str, &str)]) -> Result<Proc> {
    let mut env = env.to_vec();
    env.push(("DATABASE_URL", db_url));
    process::spawn(
        "orders-center",
        &[
            "api",
            "--listen",
            "127.0.0.1:0",
            "--database-max-connections",
            "32",
        ],
        &env,
        "api listening",
        &log_file("api"),
    )
    .await
}

/// Drains `n` tasks through the relay process into the mock process over
/// HTTP; the mock adds `latency_ms` to every answer.
async fn drain_http(n: i64, latency_ms: u64, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let db = testkit::database().await;
    prefill(
        &db.pool,
        "onec",
        "H-",
        Backlog {
            orders: n,
            bursts: false,
        },
    )
    .await?;
    let latency = format!("{latency_ms}ms");
    let mock = spawn_mock(latency_ms).await?;
    let relay = spawn_relay(&db.url, &mock.url, 500).await?;
    let started = Instant::now();
    loop {
        let stats: serde_json::Value = reqwest::get(format!("{}/stats", mock.url))
            .await?
            .json()
            .await?;
        if stats["applied"].as_i64() == Some(n) {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "HTTP drain did not finish: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let rss = relay.peak_rss_mib()?;
    let stats: serde_json::Value = reqwest::get(format!("{}/stats", mock.url))
        .await?
        .json()
        .await?;
    relay.stop().await?;
    mock.stop().await?;
    ensure!(
        stats["stale"] == 0 && stats["duplicates"] == 0,
        "HTTP drain was not exactly once: {stats}"
    );
    let rate = n as f64 / took.as_secs_f64();
    let scenario = format!("2 drain to mock over HTTP, +{latency}");
    let ceiling = pgbench_drain(
        &db,
        Backlog {
            orders: n,
            bursts: false,
        },
        DeliveryPolicy::LatestWins,
    )
    .await?;
    let target = (latency_ms == 0 && !quick).then_some(("≥ 17000", rate >= 17_000.0));
    out.push(figure(
        &scenario,
        &format!("{n} tasks drained"),
        rate,
        "task/s",
        target,
    ));
    push_ceiling(&scenario, n, rate, ceiling, out);
    out.push(figure(
        &scenario,
        "relay peak RSS",
        rss,
        "MiB",
        (!quick).then_some(("≤ 64", rss <= 64.0)),
    ));
    Ok(())
}

/// Offers `rate` saves per second for `seconds` to the API process, with a
/// relay process delivering to an in-process mock; latency runs from the
/// API's 201 (after commit) to the mock applying the version.
/// Versions of `n` orders that wait out an in-doubt hour behind an attempt
/// 1C never answered: due, and older than everything the run saves.
async fn hold_orders(pool: &PgPool, n: i64) -> Result<()> {
    sqlx::raw_sql(&format!(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, run_at, in_doubt_until)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'HELD-' || g, 1, '{{}}', now() + interval '1 hour', now() + interval '1 hour'
         FROM generate_series(1, {n}) g;
         INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, run_at)
         SELECT gen_random_uuid(), 'onec', 'order', 'order.updated', 'HELD-' || g, 2, '{{}}', now() - interval '1 minute'
         FROM generate_series(1, {n}) g;
         ANALYZE outbox"
    ))
    .execute(pool)
    .await?;
    Ok(())
}

/// Commit-to-1C latency of saves offered at `rate` for `seconds`, with
/// `held` orders waiting out the in-doubt hold beside them.
async fn latency(
    rate: u64,
    seconds: u64,
    held: i64,
    quick: bool,
    out: &mut Vec<Figure>,
) -> Result<()> {
    testkit::settle().await;
    let db = testkit::database().await;
    hold_orders(&db.pool, held).await?;
    let shutdown = CancellationToken::new();
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock_url = format!("http://{}", mock_listener.local_addr()?);
    let (mock, _) = onec_mock::spawn(
        mock_listener,
        onec_mock::MockConfig {
            username: "bench".into(),
            password: "bench".into(),
            faults: onec_mock::Faults::default(),
        },
        shutdown.clone().cancelled_owned(),
    )
    .map_err(anyhow::Error::msg)?;
    // The API and the relay run as their own processes, as deployed; the
    // mock stays in this one, to read its apply times on the same clock.
    let api = spawn_api(&db.url).await?;
    let api_url = api.url.clone();
    let relay = spawn_relay(&db.url, &mock_url, 100).await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    // At most 256 saves in flight, within the file-descriptor limit; if the
    // API falls behind, the achieved rate below shows it.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    // The first saves of fresh processes open connections and fill
    // PostgreSQL's and our caches (a 50 ms median in the first second); the
    // figure is the steady state after WARM_UP at the same rate, and the
    // warm-up's own p99 is printed beside it.
    let warm = warm_up_saves(rate, quick);
    let total = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = tokio::time::Instant::now();
    let mut saves = Vec::with_capacity((warm + total) as usize);
    for i in 0..warm + total {
        tokio::time::sleep_until(started + period * i as u32).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let id = latency_order(i, warm);
        let (http, url) = (http.clone(), format!("{api_url}/api/v1/orders/{id}"));
        let body = testkit::sample_order(&id);
        saves.push(tokio::spawn(async move {
            let _permit = permit;
            let res = http.put(url).json(&body).send().await?;
            ensure!(res.status() == 201, "save answered {}", res.status());
            Ok::<_, anyhow::Error>(Instant::now())
        }));
    }
    let mut committed = Vec::with_capacity(saves.len());
    for s in saves {
        committed.push(s.await??);
    }
    let offered_for = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lat = Vec::with_capacity(committed.len());
    for (i, at) in committed.iter().enumerate() {
        let id = latency_order(i as u64, warm);
        let applied = loop {
            if let Some((1, applied)) = mock.applied(&id) {
                break applied;
            }
            ensure!(Instant::now() < deadline, "{id} never reached the mock");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        lat.push(applied.saturating_duration_since(*at).as_secs_f64() * 1000.0);
    }
    let rss = (api.peak_rss_mib()?, relay.peak_rss_mib()?);
    relay.stop().await?;
    api.stop().await?;
    shutdown.cancel();
    let stats = mock.stats();
    ensure!(
        stats.applied == warm + total && stats.duplicates == 0 && stats.stale == 0,
        "not exactly once: {stats:?}"
    );
    let mut cold = lat.drain(..warm as usize).collect::<Vec<_>>();
    cold.sort_by(f64::total_cmp);
    lat.sort_by(f64::total_cmp);
    let scenario = if held > 0 {
        format!("3b latency at {rate} saves/s, {held} orders held in doubt")
    } else {
        format!("3 latency at {rate} saves/s")
    };
    if held > 0 {
        let still: i64 = count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE aggregateid LIKE 'HELD-%' AND state = 'pending'",
        )
        .await?;
        ensure!(still == held, "{still} of {held} held versions are left");
    }
    let achieved = (warm + total) as f64 / offered_for.as_secs_f64();
    if !cold.is_empty() {
        out.push(figure(
            &scenario,
            &format!("p99 commit → 1C, first {} s", WARM_UP.as_secs()),
            percentile(&cold, 0.99),
            "ms",
            None,
        ));
    }
    out.push(figure(
        &scenario,
        "saves/s achieved",
        achieved,
        "save/s",
        None,
    ));
    let p50 = percentile(&lat, 0.50);
    let p99 = percentile(&lat, 0.99);
    let full500 = !quick && rate == 500;
    out.push(figure(
        &scenario,
        "p50 commit → 1C",
        p50,
        "ms",
        full500.then_some(("≤ 5", p50 <= 5.0)),
    ));
    out.push(figure(
        &scenario,
        "p95 commit → 1C",
        percentile(&lat, 0.95),
        "ms",
        None,
    ));
    out.push(figure(
        &scenario,
        "p99 commit → 1C",
        p99,
        "ms",
        full500.then_some(("≤ 10", p99 <= 10.0)),
    ));
    out.push(figure(
        &scenario,
        "max commit → 1C",
        *lat.last().unwrap_or(&0.0),
        "ms",
        None,
    ));
    out.push(figure(&scenario, "api peak RSS", rss.0, "MiB", None));
    out.push(figure(&scenario, "relay peak RSS", rss.1, "MiB", None));
    Ok(())
}

/// How long the latency scenarios offer their rate before the measured
/// window.
const WARM_UP: Duration = Duration::from_secs(2);

/// Saves of the warm-up at `rate`; none in a quick run.
pub(crate) fn warm_up_saves(rate: u64, quick: bool) -> u64 {
    if quick {
        0
    } else {
        rate * WARM_UP.as_secs()
    }
}

/// The id of the latency scenario's `i`th save: the first `warm` are the
/// warm-up's.
pub(crate) fn latency_order(i: u64, warm: u64) -> String {
    if i < warm {
        format!("W-{i}")
    } else {
        format!("L-{}", i - warm)
    }
}

/// Saves through the API process at concurrency 32, next to pgbench running
/// the same transaction.
async fn api_throughput(seconds: u64, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let db = testkit::database().await;
    let api = spawn_api(&db.url).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers = (0..32).map(|w| {
        let (http, url) = (http.clone(), api.url.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let id = format!("A-{w}-{n}");
                let res = http
                    .put(format!("{url}/api/v1/orders/{id}"))
                    .json(&testkit::sample_order(&id))
                    .send()
                    .await?;
                ensure!(res.status() == 201, "save answered {}", res.status());
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        })
    });
    let mut saved = 0;
    for w in futures::future::join_all(workers).await {
        saved += w??;
    }
    let rss = api.peak_rss_mib()?;
    api.stop().await?;
    let tasks = count(&db.pool, "SELECT count(*) FROM outbox").await?;
    ensure!(tasks == saved as i64, "{saved} saves but {tasks} tasks");
    let api_rate = saved as f64 / seconds as f64;
    let ceiling = pgbench_ceiling(&db.url, seconds).await?;
    let scenario = "4 API save throughput, c=32";
    out.push(figure(
        scenario,
        "PUT /api/v1/orders/{id}",
        api_rate,
        "save/s",
        None,
    ));
    out.push(figure(
        scenario,
        "pgbench, same transaction",
        ceiling,
        "tx/s",
        None,
    ));
    let ratio = api_rate / ceiling;
    out.push(figure(
        scenario,
        "API / pgbench",
        ratio * 100.0,
        "%",
        (!quick).then_some(("≥ 70", ratio >= 0.7)),
    ));
    out.push(figure(
        scenario,
        "api peak RSS",
        rss,
        "MiB",
        (!quick).then_some(("≤ 64", rss <= 64.0)),
    ));
    Ok(())
}

/// The save transaction of `PUT /api/v1/orders/{id}` for a new order
/// (3 items, 2 payments), as pgbench runs it: the API's ceiling.
const PGBENCH_SAVE: &str = r#"\set n random(1, 2000000000)
BEGIN;
SELECT version FROM orders WHERE id = 'P-' || :client_id || '-' || :n FOR UPDATE;
INSERT INTO orders (id, type, status, city, subdivision, price, platform, general_id, order_number, executor, version)
  VALUES ('P-' || :client_id || '-' || :n, 'delivery', 'new', 'Almaty', 'ALM-01', 150.5, 'web', '0190a6f6-2a9b-7c1e-9f6a-3c1f2d4e5b6a', 'N-1', 'courier-7', 1)
  ON CONFLICT (id) DO NOTHING;
INSERT INTO order_items (order_id, position, product_id, external_id, status, base_price, price, earned_bonuses, spent_bonuses, gift, owner_id, delivery_id, shop_assistant, warehouse)
  SELECT 'P-' || :client_id || '-' || :n, * FROM UNNEST('{0,1,2}'::int4[], '{P-1,P-2,P-3}'::text[], '{L-1,"",""}'::text[], '{reserved,"",""}'::text[], '{100,40,20}'::numeric[], '{90.5,40,20}'::numeric[], '{1.5,0,0}'::numeric[], '{0,0,0}'::numeric[], '{f,f,t}'::bool[], '{u-1,"",""}'::text[], '{d-1,"",""}'::text[], '{sa-1,"",""}'::text[], '{W1,"",""}'::text[]);
INSERT INTO order_payments (order_id, position, id, type, sum, payed, info, credit_data, contract_number, card_payment_data, external_id)
  VALUES ('P-' || :client_id || '-' || :n, 0, gen_random_uuid(), 'card_online', 100, true, '', NULL, '', '{"provider":"visa","transaction_id":"T1"}', ''),
         ('P-' || :client_id || '-' || :n, 1, gen_random_uuid(), 'credit', 50.5, false, '', '{"bank":"Halyk","number_of_months":12}', 'C-9', NULL, '');
INSERT INTO order_history (order_id, type, type_id, old_value, value, user_id, version)
  VALUES ('P-' || :client_id || '-' || :n, 'status', 1, NULL, '"new"', '', 1), ('P-' || :client_id || '-' || :n, 'price', 2, NULL, '150.5', '', 1);
SELECT o.id, (SELECT json_agg(i ORDER BY i.position) FROM order_items i WHERE i.order_id = o.id),
       (SELECT json_agg(p ORDER BY p.position) FROM order_payments p WHERE p.order_id = o.id),
       (SELECT json_agg(h ORDER BY h.id) FROM order_history h WHERE h.order_id = o.id)
  FROM orders o WHERE o.id = 'P-' || :client_id || '-' || :n;
INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload) VALUES (gen_random_uuid(), 'onec', 'order', 'order.created', 'P-' || :client_id || '-' || :n, 1, '{"order":{}}');
SELECT pg_notify('outbox', '');
COMMIT;
"#;

async fn pgbench_ceiling(url: &str, seconds: u64) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("save.sql");
    std::fs::write(&script, PGBENCH_SAVE)?;
    let out = tokio::process::Command::new("pgbench")
        .args([
            "-n",
            "-c",
            "32",
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&script)
        // libpq does not know sqlx's URL parameters.
        .arg(url.split('?').next().unwrap_or(url))
        .output()
        .await
        .context("pgbench is installed (postgresql-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("tps ="))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .context("no tps in pgbench output")
}

/// Claim latency and drain rate over an empty table, over one with many
/// finished rows, and while a snapshot is held open.
async fn flat_cost(sizes: &Sizes, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let backlog = Backlog {
        orders: sizes.flat_orders,
        bursts: false,
    };
    let latest = DeliveryPolicy::LatestWins;
    let base = drain_noop(backlog, latest, 0, false).await?;
    let full = drain_noop(backlog, latest, sizes.finished_rows, false).await?;
    let held = drain_noop(backlog, latest, 0, true).await?;
    let (base_rate, base_claim) = (base.rate, base.claim_ms);
    let (full_rate, full_claim) = (full.rate, full.claim_ms);
    let held_rate = held.rate;
    for (name, drain) in [
        ("5 drain, empty table", &base),
        ("5 drain, finished rows", &full),
        ("5 drain, snapshot held open", &held),
    ] {
        out.push(figure(
            name,
            &format!("{} tasks drained", backlog.rows()),
            drain.rate,
            "task/s",
            None,
        ));
        drain.push_ceiling(name, backlog.rows(), out);
    }
    let scenario = "5 flat cost";
    out.push(figure(
        scenario,
        "claim of 100, empty table",
        base_claim,
        "ms",
        None,
    ));
    out.push(figure(
        scenario,
        &format!("claim of 100, {} finished rows", sizes.finished_rows),
        full_claim,
        "ms",
        None,
    ));
    let ratio = full_claim / base_claim;
    out.push(figure(
        scenario,
        "claim latency ratio",
        ratio,
        "x",
        (!quick).then_some(("≤ 1.2", ratio <= 1.2)),
    ));
    out.push(figure(
        scenario,
        "drain rate with finished rows",
        full_rate / base_rate * 100.0,
        "%",
        None,
    ));
    let kept = held_rate / base_rate;
    out.push(figure(
        scenario,
        "drain rate with a snapshot held",
        kept * 100.0,
        "%",
        (!quick).then_some(("≥ 70", kept >= 0.7)),
    ));
    Ok(())
}

//! 8: the order saga over a real Kafka and a real RabbitMQ, every role a
//! release process as deployed: the API, a relay, `consume saga`,
//! `inventory` and `payments` (each on its own database), the notifier,
//! the journal and the 1C mock; and over the PostgreSQL transport, every
//! role in one `orders-center dev`. Orders with a checkout go in through
//! the API; stock and funds are ample, so every saga completes.
//!
//! - throughput: a burst of sagas as fast as 64 clients create them;
//!   completed sagas per second from the first create to the last
//!   completion (both on the database clock). Ceiling: the broker's plain
//!   confirmed publish rate divided by the 4 messages of one saga;
//! - latency: 200 sagas a second offered (the target's load), and half the
//!   throughput just measured, each once every database has delivered what
//!   the run before left; create to `completed`, p50 and p99. Ceiling: 3
//!   plain publish-to-receive round trips in a row, the hops from create to
//!   completed, at 200 a second.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use serde_json::json;
use testkit::process::{self as process, Proc};

use crate::brokers::Broker;
use crate::scenarios::{figure, percentile};
use crate::Figure;

const PRODUCTS: usize = 20;
const ACCOUNTS: usize = 200;

/// The saga's processes on one broker.
struct Platform {
    roles: Vec<Proc>,
    /// Each role's process id and name, for the CPU figures.
    names: HashMap<u32, String>,
    api: String,
    orders: sqlx::PgPool,
    /// The orders, inventory and payments databases.
    databases: [sqlx::PgPool; 3],
}

fn log(role: &str) -> std::path::PathBuf {
    testkit::target_tmp()
        .join("bench")
        .join(format!("saga-{role}.log"))
}

impl Platform {
    /// `orders-center dev`: every role in one process, the saga's messages
    /// over the PostgreSQL transport.
    async fn start_local() -> Result<Self> {
        let orders = testkit::database().await;
        let inventory_db = testkit::unmigrated_database().await;
        let payments_db = testkit::unmigrated_database().await;
        let any = "127.0.0.1:0";
        let env = [
            ("DATABASE_URL", orders.url.as_str()),
            ("INVENTORY_DATABASE_URL", inventory_db.url.as_str()),
            ("PAYMENTS_DATABASE_URL", payments_db.url.as_str()),
            ("SAGA_STEP_TIMEOUT", "10m"),
            ("LISTEN_ADDR", any),
            ("RELAY_LISTEN_ADDR", any),
            ("ONEC_MOCK_LISTEN_ADDR", any),
            ("INVENTORY_LISTEN_ADDR", any),
            ("PAYMENTS_LISTEN_ADDR", any),
            ("NOTIFIER_LISTEN_ADDR", any),
            ("RELAY_POLL_INTERVAL", "100ms"),
        ];
        let dev = process::spawn(
            "orders-center",
            &["dev"],
            &env,
            "dev listening",
            &log("dev"),
        )
        .await?;
        // The ready line names each service: `inventory=http://...`.
        let line = dev.ready_line.clone();
        let service = |name: &str| -> Result<String> {
            let at = line
                .find(&format!("{name}=http://"))
                .with_context(|| format!("no {name} URL in {line:?}"))?;
            let url = &line[at + name.len() + 1..];
            Ok(url
                .split(|c: char| c.is_whitespace() || c == '"')
                .next()
                .unwrap_or_default()
                .to_owned())
        };
        let (inventory, payments) = (service("inventory")?, service("payments")?);
        let names = HashMap::from([(dev.pid()?, "dev (every role)".to_owned())]);
        let platform = Self {
            api: dev.url.clone(),
            roles: vec![dev],
            names,
            databases: [orders.pool.clone(), inventory_db.pool, payments_db.pool],
            orders: orders.pool,
        };
        platform.stock_and_fund(&inventory, &payments).await?;
        Ok(platform)
    }

    async fn start(broker: &Broker, prefix: &str) -> Result<Self> {
        let url = broker.url();
        let orders = testkit::database().await;
        let inventory_db = testkit::unmigrated_database().await;
        let payments_db = testkit::unmigrated_database().await;
        let env = [
            ("DATABASE_URL", orders.url.as_str()),
            ("INVENTORY_DATABASE_URL", inventory_db.url.as_str()),
            ("PAYMENTS_DATABASE_URL", payments_db.url.as_str()),
            ("BROKER", url.as_str()),
            ("BROKER_PREFIX", prefix),
            ("SAGAS", "true"),
            // A burst queues sagas for longer than the default step
            // timeout; here every saga is meant to complete.
            ("SAGA_STEP_TIMEOUT", "10m"),
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("ONEC_USERNAME", "bench"),
            ("ONEC_PASSWORD", "bench"),
            ("RELAY_POLL_INTERVAL", "100ms"),
            ("CONSUMER_BATCH", "100"),
        ];
        let mock = crate::scenarios::spawn_mock(0).await?;
        let onec = [("ONEC_URL", mock.url.clone())];
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.extend(onec.iter().map(|(k, v)| (*k, v.as_str())));
        let mut names = HashMap::from([(mock.pid()?, "1C mock".to_owned())]);
        let mut roles = vec![mock];
        // Consumers first: on RabbitMQ they declare the queues publishes go to.
        for (name, args, ready) in [
            ("journal", &["consume", "journal"][..], "consumer started"),
            // The orchestrator's Kafka partitions in parallel: it does the
            // most work per message and touches one order per message.
            (
                "orchestrator",
                &["consume", "saga", "--members", "3"][..],
                "consumer started",
            ),
            (
                "inventory",
                &["inventory", "--migrate"][..],
                "service started",
            ),
            (
                "payments",
                &["payments", "--migrate"][..],
                "service started",
            ),
            ("notifier", &["notifier"][..], "notifier started"),
            (
                "api",
                &["api", "--database-max-connections", "32"][..],
                "api listening",
            ),
            ("relay", &["relay"][..], "relay started"),
        ] {
            let role = process::spawn("orders-center", args, &env, ready, &log(name)).await?;
            names.insert(role.pid()?, name.to_owned());
            roles.push(role);
        }
        let url = |i: usize| roles[i].url.clone();
        let (inventory, payments, api) = (url(3), url(4), url(6));
        let platform = Self {
            roles,
            names,
            api,
            databases: [orders.pool.clone(), inventory_db.pool, payments_db.pool],
            orders: orders.pool,
        };
        platform.stock_and_fund(&inventory, &payments).await?;
        Ok(platform)
    }

    /// Ample stock of every product and funds in every account.
    async fn stock_and_fund(&self, inventory: &str, payments: &str) -> Result<()> {
        let http = reqwest::Client::new();
        for p in 0..PRODUCTS {
            let res = http
                .put(format!("{inventory}/api/v1/stock/sku-{p}"))
                .json(&json!({"available": 1_000_000_000i64}))
                .send()
                .await?;
            ensure!(res.status().is_success(), "stocking: {}", res.status());
        }
        for a in 0..ACCOUNTS {
            let id = format!("acc-{a}");
            for (path, body) in [
                (String::new(), json!({"account_id": id})),
                (format!("/{id}/top-ups"), json!({"amount": 1_000_000_000})),
            ] {
                let res = http
                    .post(format!("{payments}/api/v1/accounts{path}"))
                    .json(&body)
                    .send()
                    .await?;
                ensure!(res.status().is_success(), "funding: {}", res.status());
            }
        }
        Ok(())
    }

    /// Outbox rows inserted and log events appended so far, in all three
    /// databases: what their sequences handed out (a save that coalesced
    /// into a pending row takes none).
    async fn rows_written(&self) -> Result<i64> {
        let mut total = 0;
        for db in &self.databases {
            let n: i64 = sqlx::query_scalar(
                "SELECT coalesce(pg_sequence_last_value(
                            pg_get_serial_sequence('outbox', 'id')::regclass), 0)
                      + coalesce(pg_sequence_last_value('event_log_position'), 0)",
            )
            .fetch_one(db)
            .await?;
            total += n;
        }
        Ok(total)
    }

    async fn stop(self) -> Result<()> {
        for role in self.roles.into_iter().rev() {
            role.stop().await?;
        }
        Ok(())
    }

    /// Creates saga `id` through the API.
    async fn create(&self, http: &reqwest::Client, id: &str, i: usize) -> Result<()> {
        let body = order(id, i);
        let res = http
            .put(format!("{}/api/v1/orders/{id}", self.api))
            .json(&body)
            .send()
            .await?;
        ensure!(res.status().is_success(), "create {id}: {}", res.status());
        Ok(())
    }

    /// Waits until every database has delivered all it holds: no open 1C
    /// row, every log cursor past every event. A latency run that starts
    /// while the burst's 1C versions and journal events still drain
    /// measures that drain, not the saga.
    async fn quiet(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for db in &self.databases {
            let store = store::Store::new(db.clone());
            loop {
                let open: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE state IN ('pending', 'running'))",
                )
                .fetch_one(db)
                .await?;
                let destinations = store.log_destinations().await?;
                let behind: i64 = store
                    .cursor_lag(&destinations)
                    .await?
                    .iter()
                    .map(|l| l.events)
                    .sum();
                if !open && behind == 0 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "still delivering after {within:?}: 1C rows open {open}, {behind} events behind"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Waits until the sagas named `prefix…` are over; all must complete.
    async fn finished(&self, prefix: &str, n: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let (done, completed): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE finished_at IS NOT NULL),
                        count(*) FILTER (WHERE state = 'completed')
                 FROM sagas WHERE order_id LIKE $1 || '%'",
            )
            .bind(prefix)
            .fetch_one(&self.orders)
            .await?;
            if done as usize >= n {
                ensure!(
                    completed == done,
                    "{} of {done} sagas did not complete",
                    done - completed
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{done} of {n} sagas over after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs both saga figures on `broker`, or over the PostgreSQL transport
/// (`orders-center dev`) without one.
pub async fn run(
    broker: Option<&mut Broker>,
    quick: bool,
    seconds: u64,
    out: &mut Vec<Figure>,
) -> Result<()> {
    let name = broker.as_ref().map_or("postgresql", |b| b.name());
    let scenario = format!("8 saga over {name}");
    let platform = match &broker {
        Some(broker) => Platform::start(broker, &format!("saga-{}-", std::process::id())).await?,
        None => Platform::start_local().await?,
    };
    let http = reqwest::Client::new();

    // Throughput: a burst.
    let n = if quick { 300 } else { 5_000 };
    let rows_before = platform.rows_written().await?;
    let cpu = crate::cpu::Sample::now()?;
    futures::stream::iter(0..n)
        .map(|i| {
            let (platform, http) = (&platform, &http);
            async move { platform.create(http, &format!("SB-{i}"), i).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<Result<()>>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    platform
        .finished("SB-", n, Duration::from_secs(600))
        .await?;
    let span: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8
         FROM sagas WHERE order_id LIKE 'SB-%'",
    )
    .fetch_one(&platform.orders)
    .await?;
    let spent = cpu.until(&crate::cpu::Sample::now()?, &platform.names)?;
    // Read once the journal and notifier are through: the last rows are
    // the notifications' and 1C's after the final status.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = (platform.rows_written().await? - rows_before) as f64 / n as f64;
    let rate = n as f64 / span;
    out.push(figure(
        &scenario,
        &format!("{n} sagas, create to completed"),
        rate,
        "saga/s",
        (!quick).then_some(("≥ 500", rate >= 500.0)),
    ));
    cpu_per_saga(&scenario, &spent, n, quick, out);
    out.push(figure(
        &scenario,
        "outbox rows and log events per saga, all databases",
        rows,
        "rows",
        (!quick).then_some(("≤ 10", rows <= 10.0)),
    ));

    // Latency at 200 sagas a second offered (the target's load), and at
    // half the capacity just measured, where the pipeline is not queueing.
    let half = ((rate / 2.0).floor() as u64).clamp(1, 200);
    for (tag, offered, secs) in [("SL-", 200u64, seconds.min(10)), ("SH-", half, seconds)] {
        platform.quiet(Duration::from_secs(300)).await?;
        let (p50, p99) = latency(&platform, &http, tag, offered, secs).await?;
        out.push(figure(
            &scenario,
            &format!("{offered} sagas/s offered: p50"),
            p50,
            "ms",
            None,
        ));
        out.push(figure(
            &scenario,
            &format!("{offered} sagas/s offered: p99"),
            p99,
            "ms",
            (!quick && offered == 200).then_some(("≤ 250", p99 <= 250.0)),
        ));
    }
    platform
        .stop()
        .await
        .context("stopping the saga's processes")?;

    // The broker alone: confirmed publishes per second over the 4 messages
    // of a saga, and the 3 plain round trips in a row from create to
    // completed (ReserveStock, StockReserved, PaymentSucceeded).
    let Some(broker) = broker else {
        return Ok(());
    };
    broker.fresh(&format!("sagaplain{}", std::process::id()));
    broker.prepare().await?;
    let published =
        crate::brokers::plain_publish(broker, if quick { 2_000 } else { 50_000 }).await?;
    out.push(figure(
        &scenario,
        "ceiling: plain publishes / 4",
        published / 4.0,
        "saga/s",
        None,
    ));
    let (rt50, rt99) = crate::brokers::plain_round_trip(broker, 200, seconds.min(10)).await?;
    out.push(figure(
        &scenario,
        "ceiling: 3 plain round trips, p50",
        rt50 * 3.0,
        "ms",
        None,
    ));
    out.push(figure(
        &scenario,
        "ceiling: 3 plain round trips, p99",
        rt99 * 3.0,
        "ms",
        None,
    ));
    Ok(())
}

/// The burst's CPU per saga: the machine's, next to what 500 sagas a second
/// leave on its cores, and each process group's.
fn cpu_per_saga(
    scenario: &str,
    spent: &crate::cpu::Spent,
    n: usize,
    quick: bool,
    out: &mut Vec<Figure>,
) {
    let per_saga = |seconds: f64| seconds * 1000.0 / n as f64;
    let machine = per_saga(spent.machine);
    let budget = spent.cores as f64 * 1000.0 / 500.0;
    out.push(figure(
        scenario,
        "CPU per saga, the whole machine",
        machine,
        "ms",
        (!quick).then_some((
            &format!("≤ {budget:.1} ({} cores at 500/s)", spent.cores),
            machine <= budget,
        )),
    ));
    for (group, seconds) in &spent.groups {
        let ms = per_saga(*seconds);
        // Below this the figure is noise of the sampling.
        if ms >= 0.05 {
            out.push(figure(
                scenario,
                &format!("CPU per saga: {group}"),
                ms,
                "ms",
                None,
            ));
        }
    }
}

/// Offers `offered` sagas a second for `seconds` (ids `tag…`), waits until
/// all completed, and answers create-to-completed p50 and p99 in ms.
async fn latency(
    platform: &Platform,
    http: &reqwest::Client,
    tag: &str,
    offered: u64,
    seconds: u64,
) -> Result<(f64, f64)> {
    let total = (offered * seconds) as usize;
    let period = Duration::from_secs_f64(1.0 / offered as f64);
    let started = tokio::time::Instant::now();
    let mut creates = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(started + period * i as u32).await;
        let (http, api) = (http.clone(), platform.api.clone());
        let id = format!("{tag}{i}");
        let body = order(&id, i);
        creates.push(tokio::spawn(async move {
            let res = http
                .put(format!("{api}/api/v1/orders/{id}"))
                .json(&body)
                .send()
                .await?;
            ensure!(res.status().is_success(), "create {id}: {}", res.status());
            anyhow::Ok(())
        }));
    }
    for c in creates {
        c.await??;
    }
    platform
        .finished(tag, total, Duration::from_secs(600))
        .await?;
    let mut took: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000
         FROM sagas WHERE order_id LIKE $1 || '%'",
    )
    .bind(tag)
    .fetch_all(&platform.orders)
    .await?;
    took.sort_by(f64::total_cmp);
    Ok((percentile(&took, 0.50), percentile(&took, 0.99)))
}

/// Saga order `id`: one unit of one product, paid from one account.
fn order(id: &str, i: usize) -> serde_json::Value {
    let mut body = testkit::sample_order_with(id, "new", 150.5);
    body["checkout"] = json!({
        "account_id": format!("acc-{}", i % ACCOUNTS),
        "reserve": [{"product_id": format!("sku-{}", i % PRODUCTS), "quantity": 1}],
    });
    body
}

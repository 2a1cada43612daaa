//! 11: the event log over the PostgreSQL transport. A relay process drains
//! a backlog of order notices from the log into the journal's inbox (one
//! inbox transaction per partition run), at a small and at a large
//! backlog appended at once while it idles; the large run also shows the relay's memory and that the log
//! left nothing for VACUUM. The commit → journal latency of this transport
//! is in `brokers::latency`, with the brokers'.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sqlx::PgPool;
use store::Store;
use testkit::process::Proc;

use crate::scenarios::figure;
use crate::Figure;

const SCENARIO: &str = "11 event log, PostgreSQL transport";

/// Appends `n` order notices for `destination` to the log in one statement,
/// one order each (keys `<prefix><n>`), spread over the partitions as
/// `log_config` has them. The hash does not matter here: each key has one
/// event.
pub(crate) async fn prefill_log(
    pool: &PgPool,
    destination: &str,
    prefix: &str,
    n: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO event_log (position, segment, destination, partition, event_id,
                                aggregatetype, aggregateid, type, version, payload)
         SELECT e.p, ((e.p / c.segment_size) % c.segments)::smallint, $1,
                (e.g % c.partitions)::smallint, e.id, 'order', $2 || e.g, 'order.created', 1,
                jsonb_build_object('idempotent_key', e.id, 'order_id', $2 || e.g, 'version', 1,
                                   'status', 'new', 'type', 'order.created',
                                   'occurred_at', now())
         FROM (SELECT nextval('event_log_position') AS p, g, gen_random_uuid() AS id
               FROM generate_series(1, $3) g) e
         CROSS JOIN log_config c",
    )
    .bind(destination)
    .bind(prefix)
    .bind(n)
    .execute(pool)
    .await?;
    Ok(())
}

/// What one drain through the relay process measured.
struct Drain {
    rate: f64,
    rss_mib: f64,
    /// Dead tuples, updates and deletes on the log's segments, and
    /// autovacuum runs on them, as the statistics have them after the
    /// relay stopped (its backends flush theirs on exit).
    dead_tuples: i64,
    updated_or_deleted: i64,
    autovacuums: i64,
    /// Segments the rotation truncated afterwards.
    truncated: usize,
}

/// A relay process delivering the log's `journal` destination (and
/// nothing else: no 1C route) with the PostgreSQL transport.
async fn spawn_relay(db_url: &str) -> Result<Proc> {
    let routes = [("EVENT_ROUTES", "journal=order.created")];
    crate::scenarios::spawn_relay_with(db_url, "http://127.0.0.1:9", 500, &routes, "log-relay")
        .await
}

/// `orders_center_outbox_delivered_total{destination="journal"}` of the
/// relay at `url`.
async fn delivered(client: &reqwest::Client, url: &str) -> Result<i64> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("orders_center_outbox_delivered_total{destination=\"journal\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map_or(0, |v| v as i64))
}

/// Starts the relay on an empty log, waits until it has made its cursors,
/// then appends `n` events in one transaction and times their delivery
/// from its commit: the drain rate without the process's start.
async fn drain(n: i64) -> Result<Drain> {
    let db = testkit::database().await;
    let relay = spawn_relay(&db.url).await?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM log_cursors")
        .fetch_one(&db.pool)
        .await?
        == 0
    {
        ensure!(Instant::now() < deadline, "the relay made no cursors");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    prefill_log(&db.pool, "journal", "G-", n).await?;
    let started = Instant::now();
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(store::NOTIFY_CHANNEL)
        .execute(&db.pool)
        .await?;
    while delivered(&client, &relay.url).await? < n {
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "the log drain of {n} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let rss_mib = relay.peak_rss_mib()?;
    relay.stop().await?;
    let journaled: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM order_journal")
        .fetch_one(&db.pool)
        .await?;
    ensure!(journaled == n, "{journaled} of {n} events journaled");
    let (dead_tuples, updated_or_deleted, autovacuums): (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(n_dead_tup), 0)::int8,
                coalesce(sum(n_tup_upd + n_tup_del + n_tup_hot_upd), 0)::int8,
                coalesce(sum(autovacuum_count), 0)::int8
         FROM pg_stat_user_tables WHERE relname LIKE 'event\\_log\\_%'",
    )
    .fetch_one(&db.pool)
    .await?;
    let truncated = Store::new(db.pool.clone())
        .rotate_log()
        .await
        .context("rotating the log")?
        .len();
    Ok(Drain {
        rate,
        rss_mib,
        dead_tuples,
        updated_or_deleted,
        autovacuums,
        truncated,
    })
}

pub async fn run(small: i64, large: i64, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    eprintln!("event log: draining {small} events, three times");
    let mut small_rates = Vec::new();
    for _ in 0..3 {
        small_rates.push(drain(small).await?.rate);
    }
    small_rates.sort_by(f64::total_cmp);
    let small_rate = small_rates[1];
    eprintln!("event log: draining {large} events");
    let big = drain(large).await?;
    let full = !quick;
    out.push(figure(
        SCENARIO,
        &format!("{small} events drained (median of 3)"),
        small_rate,
        "event/s",
        None,
    ));
    out.push(figure(
        SCENARIO,
        &format!("{large} events drained"),
        big.rate,
        "event/s",
        full.then_some(("≥ 100000", big.rate >= 100_000.0)),
    ));
    let kept = big.rate / small_rate;
    out.push(figure(
        SCENARIO,
        &format!("drain at {large} / at {small}"),
        kept,
        "ratio",
        full.then_some(("≥ 0.9", kept >= 0.9)),
    ));
    out.push(figure(
        SCENARIO,
        "the log's dead tuples after the drain",
        big.dead_tuples as f64,
        "tuples",
        Some(("0", big.dead_tuples == 0)),
    ));
    out.push(figure(
        SCENARIO,
        "updates and deletes of log rows",
        big.updated_or_deleted as f64,
        "rows",
        Some(("0", big.updated_or_deleted == 0)),
    ));
    out.push(figure(
        SCENARIO,
        "autovacuum runs on the log",
        big.autovacuums as f64,
        "runs",
        Some(("0", big.autovacuums == 0)),
    ));
    out.push(figure(
        SCENARIO,
        "segments truncated after the drain",
        big.truncated as f64,
        "segments",
        None,
    ));
    out.push(figure(
        SCENARIO,
        "relay peak RSS",
        big.rss_mib,
        "MiB",
        full.then_some(("≤ 64", big.rss_mib <= 64.0)),
    ));
    Ok(())
}

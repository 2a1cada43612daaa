//! 9: the API's order cache, every API a process as deployed.
//!
//! - warm-up: 100,000 orders (3 items and a payment each) in the database;
//!   an API process starts with a cache large enough for all of them, and
//!   the time to `/readyz` is the warm-up;
//! - reads: `GET /api/v1/orders/{id}` of random warmed orders from
//!   `concurrency` clients, each on its own connection, against the same
//!   reads from an API with the cache off (every read a database query):
//!   requests per second, p50 and p99, at each load (4 to 64, doubling);
//!   the cache's best load is the lightest one within 10% of its highest
//!   throughput (past it clients only queue), compared with the uncached
//!   API's highest throughput at any load;
//! - lag: a second API writes 200 orders a second; the first one's
//!   `orders_center_cache_notification_lag_seconds` (commit to applied)
//!   gives the change-to-other-replica lag.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sqlx::PgPool;
use testkit::process::Proc;

use crate::scenarios::{figure, percentile, spawn_api_with};
use crate::Figure;

const SCENARIO: &str = "9 order cache";

/// Orders with 3 items and a payment each, `C-1` the most recently updated.
async fn seed(pool: &PgPool, n: i64) -> Result<()> {
    let mut conn = pool.acquire().await?;
    // The fixture, not what is measured: no notification per row.
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO orders (id, type, status, city, subdivision, price, platform,
                             general_id, order_number, executor, version, updated_at)
         SELECT 'C-' || g, 'delivery', 'new', 'Almaty', 'ALM-01', 150.5, 'web',
                gen_random_uuid(), 'N-' || g, 'courier-7', 1, now() - g * interval '1 ms'
         FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO order_items (order_id, position, product_id, external_id, status,
             base_price, price, earned_bonuses, spent_bonuses, gift, owner_id, delivery_id,
             shop_assistant, warehouse)
         SELECT 'C-' || g, p, 'P-' || p, 'L-' || p, 'reserved', 100, 90.5, 1.5, 0, p = 2,
                'u-1', 'd-1', 'sa-1', 'W1'
         FROM generate_series(1, $1) g, generate_series(0, 2) p",
    )
    .bind(n)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO order_payments (order_id, position, id, type, sum, payed, info,
             contract_number, card_payment_data, external_id)
         SELECT 'C-' || g, 0, gen_random_uuid(), 'card_online', 150.5, true, '', '',
                '{\"provider\": \"visa\", \"transaction_id\": \"T1\"}', ''
         FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&mut *conn)
    .await?;
    sqlx::query("ANALYZE").execute(&mut *conn).await?;
    Ok(())
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<String> {
    Ok(http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

async fn metric(http: &reqwest::Client, url: &str, series: &str) -> Result<f64> {
    Ok(scrape(http, url)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// A quantile of a Prometheus histogram from its cumulative buckets, as
/// `histogram_quantile` interpolates it.
async fn histogram_quantile(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    q: f64,
) -> Result<(f64, u64)> {
    let text = scrape(http, url).await?;
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    ensure!(total > 0.0, "{name} has no samples");
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Ok((lower, total as u64));
            }
            let within = (rank - below) / (count - below).max(1.0);
            return Ok((lower + (le - lower) * within, total as u64));
        }
        (lower, below) = (le, count);
    }
    Ok((lower, total as u64))
}

async fn until_ready(http: &reqwest::Client, api: &Proc, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let ready = http
            .get(format!("{}/readyz", api.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < within,
            "the API was not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What one read load measured.
struct Reads {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    hits: bool,
}

/// One load client: its own keep-alive HTTP/1.1 connection, as wrk keeps
/// one. Through reqwest's shared pool the clients took 75–80% of a core
/// beside the API's 100%; this way they take about 55%. On two cores every
/// cycle the clients take is one the server under test loses.
async fn client(addr: &str, n: i64, deadline: Instant) -> Result<(Vec<f64>, usize)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let (mut latencies, mut hits) = (Vec::new(), 0usize);
    while Instant::now() < deadline {
        let id = rand::random_range(1..=n);
        let req = hyper::Request::get(format!("/api/v1/orders/C-{id}"))
            .header(hyper::header::HOST, addr)
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
        let started = Instant::now();
        sender.ready().await?;
        let res = sender.send_request(req).await?;
        ensure!(res.status() == 200, "read answered {}", res.status());
        hits += usize::from(
            res.headers()
                .get("cache-status")
                .is_some_and(|v| v.as_bytes().ends_with(b"hit")),
        );
        http_body_util::BodyExt::collect(res.into_body()).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(sender);
    conn.await??;
    Ok((latencies, hits))
}

/// `concurrency` clients reading random orders of `C-1..=C-n` for `seconds`.
async fn reads(url: &str, n: i64, concurrency: usize, seconds: u64) -> Result<Reads> {
    let addr = url.strip_prefix("http://").context("an http:// URL")?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers = (0..concurrency).map(|_| {
        let addr = addr.to_owned();
        tokio::spawn(async move { client(&addr, n, deadline).await })
    });
    let started = Instant::now();
    let (mut all, mut hits) = (Vec::new(), 0);
    for w in futures::future::join_all(workers).await {
        let (l, h) = w??;
        all.extend(l);
        hits += h;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok(Reads {
        rate: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        hits: hits == all.len(),
    })
}

/// The reads at each load, each figure reported.
async fn sweep(
    label: &str,
    url: &str,
    n: i64,
    loads: &[usize],
    seconds: u64,
    out: &mut Vec<Figure>,
) -> Result<Vec<(usize, Reads)>> {
    let mut runs = Vec::new();
    for &c in loads {
        let r = reads(url, n, c, seconds).await?;
        eprintln!(
            "{label}, c={c}: {:.0}/s p50 {:.2} ms p99 {:.2} ms",
            r.rate, r.p50_ms, r.p99_ms
        );
        let name = format!("GET, {label}, c={c}");
        out.push(figure(SCENARIO, &name, r.rate, "req/s", None));
        out.push(figure(
            SCENARIO,
            &format!("{name}, p99"),
            r.p99_ms,
            "ms",
            None,
        ));
        runs.push((c, r));
    }
    Ok(runs)
}

/// The best load: the lightest one within 10% of the highest throughput.
/// Past it more clients only queue: throughput stays, latency grows.
fn knee(runs: &[(usize, Reads)]) -> Option<(usize, &Reads)> {
    let peak = runs.iter().map(|(_, r)| r.rate).fold(0.0, f64::max);
    runs.iter()
        .find(|(_, r)| r.rate >= 0.9 * peak)
        .map(|(c, r)| (*c, r))
}

pub async fn run(quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let (n, seconds, loads): (i64, u64, &[usize]) = if quick {
        (2_000, 1, &[8])
    } else {
        (100_000, 10, &[4, 8, 16, 32, 64])
    };
    let db = testkit::database().await;
    eprintln!("cache: {n} orders");
    seed(&db.pool, n).await?;
    let http = reqwest::Client::new();

    // Warm-up: start to ready, with every order fitting the budget.
    let started = Instant::now();
    let cached = spawn_api_with(
        &db.url,
        &[("CACHE_BUDGET", "1GiB"), ("CACHE_WARMUP_LIMIT", "5m")],
    )
    .await?;
    until_ready(&http, &cached, Duration::from_secs(300)).await?;
    let to_ready = started.elapsed().as_secs_f64();
    let warmup = metric(&http, &cached.url, "orders_center_cache_warmup_seconds").await?;
    let entries = metric(&http, &cached.url, "orders_center_cache_entries").await?;
    let bytes = metric(&http, &cached.url, "orders_center_cache_size_bytes").await?;
    ensure!(entries as i64 == n, "{entries} of {n} orders warmed");
    out.push(figure(
        SCENARIO,
        &format!("warm-up of {n} orders"),
        warmup,
        "s",
        None,
    ));
    out.push(figure(
        SCENARIO,
        "process start to ready",
        to_ready,
        "s",
        None,
    ));
    out.push(figure(
        SCENARIO,
        "cache size after warm-up",
        bytes / f64::from(1 << 20),
        "MiB",
        None,
    ));

    let on_runs = sweep("cache on", &cached.url, n, loads, seconds, out).await?;
    ensure!(
        on_runs.iter().all(|(_, r)| r.hits),
        "a read of a warmed order missed the cache"
    );
    let rss = cached.peak_rss_mib()?;
    cached.stop().await?;
    let uncached = spawn_api_with(&db.url, &[("CACHE_BUDGET", "0")]).await?;
    let off_runs = sweep("cache off", &uncached.url, n, loads, seconds, out).await?;
    uncached.stop().await?;
    let (cc, on) = knee(&on_runs).context("no load ran")?;
    let (uc, off) = knee(&off_runs).context("no load ran")?;
    // Against the uncached API's highest throughput at any load, so the
    // ratio never flatters the cache.
    let off_peak = off_runs.iter().map(|(_, r)| r.rate).fold(0.0, f64::max);
    let ratio = on.rate / off_peak;
    out.push(figure(
        SCENARIO,
        &format!("best load cached: c={cc}, p50"),
        on.p50_ms,
        "ms",
        None,
    ));
    out.push(figure(
        SCENARIO,
        &format!("best load cached: c={cc}, p99"),
        on.p99_ms,
        "ms",
        (!quick).then_some(("≤ 2", on.p99_ms <= 2.0)),
    ));
    out.push(figure(
        SCENARIO,
        &format!("best load uncached: c={uc}, p50"),
        off.p50_ms,
        "ms",
        None,
    ));
    out.push(figure(
        SCENARIO,
        &format!("best load uncached: c={uc}, p99"),
        off.p99_ms,
        "ms",
        None,
    ));
    out.push(figure(
        SCENARIO,
        "throughput, cached / uncached",
        ratio,
        "x",
        (!quick).then_some(("≥ 5", ratio >= 5.0)),
    ));
    out.push(figure(
        SCENARIO,
        "api peak RSS, cache full",
        rss,
        "MiB",
        None,
    ));

    lag(&db.url, &http, quick, out).await
}

/// Writes through one API at 200/s and reads the other's notification lag.
async fn lag(
    db_url: &str,
    http: &reqwest::Client,
    quick: bool,
    out: &mut Vec<Figure>,
) -> Result<()> {
    let (rate, seconds) = if quick { (50, 1) } else { (200, 10) };
    let reader = spawn_api_with(db_url, &[("CACHE_BUDGET", "64MiB")]).await?;
    let writer = spawn_api_with(db_url, &[("CACHE_BUDGET", "0")]).await?;
    until_ready(http, &reader, Duration::from_secs(300)).await?;
    let writes = rate * seconds;
    let period = Duration::from_secs(1) / rate as u32;
    let started = tokio::time::Instant::now();
    let mut sends = Vec::new();
    for i in 0..writes {
        tokio::time::sleep_until(started + period * i as u32).await;
        let (http, url) = (http.clone(), writer.url.clone());
        sends.push(tokio::spawn(async move {
            let id = format!("LAG-{i}");
            let res = http
                .put(format!("{url}/api/v1/orders/{id}"))
                .json(&testkit::sample_order(&id))
                .send()
                .await?;
            ensure!(res.status() == 201, "save answered {}", res.status());
            anyhow::Ok(())
        }));
    }
    for s in sends {
        s.await??;
    }
    let name = "orders_center_cache_notification_lag_seconds";
    let deadline = Instant::now() + Duration::from_secs(10);
    let (p99, count) = loop {
        let (p99, count) = histogram_quantile(http, &reader.url, name, 0.99).await?;
        if count >= writes || Instant::now() > deadline {
            break (p99, count);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(
        count >= writes,
        "the reader applied {count} of {writes} notifications"
    );
    let (p50, _) = histogram_quantile(http, &reader.url, name, 0.5).await?;
    reader.stop().await?;
    writer.stop().await?;
    let label = format!("change to other replica, {rate} writes/s");
    out.push(figure(
        SCENARIO,
        &format!("{label}, p50"),
        p50 * 1000.0,
        "ms",
        None,
    ));
    out.push(figure(
        SCENARIO,
        &format!("{label}, p99"),
        p99 * 1000.0,
        "ms",
        (!quick).then_some(("≤ 50", p99 * 1000.0 <= 50.0)),
    ));
    Ok(())
}

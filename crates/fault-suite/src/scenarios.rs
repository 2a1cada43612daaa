//! The seven fault scenarios. Each drives saves through the API while
//! something fails, waits for the outbox to drain, and reports what 1C saw.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use futures::StreamExt;

use crate::load::{saves, Client, Saved};
use crate::system::{System, API_TOKEN, ONEC_PASSWORD, RELAYS};

/// The figures of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub scenario: &'static str,
    /// Saves the API confirmed.
    pub saves: u64,
    /// Deliveries 1C received (applied, duplicates and stale).
    pub deliveries: u64,
    /// Deliveries of a version 1C already had, absorbed by its version check.
    pub duplicates: u64,
    /// Deliveries older than what 1C had.
    pub stale: u64,
    /// Orders whose latest version never reached 1C.
    pub lost: u64,
    /// Dead tasks.
    pub dead: i64,
    /// From the end of the fault (or the load) until the backlog was empty.
    pub recovery_s: f64,
    /// What else the scenario measured.
    pub notes: String,
}

fn stat(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_default()
}

/// Waits for the drain, then compares 1C with the database, the source of
/// truth, for the orders this scenario saved.
pub(crate) async fn settle(
    sys: &System,
    scenario: &'static str,
    before: &Value,
    saved: &Saved,
    recovery_from: Instant,
    notes: String,
) -> Result<Figures> {
    sys.drained(Duration::from_secs(180)).await?;
    let recovery = recovery_from.elapsed();
    let after = sys.mock_stats().await?;
    let held = sys.mock_versions().await?;
    let ids: Vec<&String> = saved.versions.keys().collect();
    let db: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT id, version FROM orders WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&sys.pool)
            .await?
            .into_iter()
            .collect();
    let mut lost = 0;
    for (id, confirmed) in &saved.versions {
        let truth = db.get(id).copied().unwrap_or_default();
        ensure!(
            truth >= *confirmed,
            "{id}: the API confirmed version {confirmed}, the database holds {truth}"
        );
        if held.get(id).copied() != Some(truth) {
            lost += 1;
        }
    }
    let delta = |k| stat(&after, k) - stat(before, k);
    Ok(Figures {
        scenario,
        saves: saved.saves,
        deliveries: delta("received"),
        duplicates: delta("duplicates"),
        stale: delta("stale"),
        lost,
        dead: sys.backlog().await?.dead,
        recovery_s: recovery.as_secs_f64(),
        notes,
    })
}

fn client(sys: &System) -> Client {
    Client::new(sys.http.clone(), &sys.api.url)
}

fn ensure_only_promised_failures(client: &Client) -> Result<crate::load::Tally> {
    let tally = client.tally();
    ensure!(
        tally.unexpected.is_empty(),
        "the API answered outside its contract: {:?}",
        &tally.unexpected[..tally.unexpected.len().min(5)]
    );
    Ok(tally)
}

/// 1. SIGKILL a relay every 2.5 s while saves flow, every other time the
///    leader, and start it again.
pub async fn relay_kills(sys: &mut System, creates: usize) -> Result<Figures> {
    let before = sys.mock_stats().await?;
    let c = client(sys);
    let load = tokio::spawn({
        let c = c.clone();
        async move { saves(&c, "KILL", creates, 32).await }
    });
    let (mut kills, mut leader_kills) = (0, 0);
    let started = Instant::now();
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        if load.is_finished() {
            break;
        }
        let leader = sys.leader().await?;
        let victim = match leader {
            Some(l) if kills % 2 == 0 => l,
            _ => rand::random_range(0..RELAYS),
        };
        if leader == Some(victim) {
            leader_kills += 1;
        }
        sys.kill_relay(victim).await?;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
        sys.start_relay(victim).await?;
    }
    let saved = load.await??;
    let load_s = started.elapsed().as_secs_f64();
    ensure_only_promised_failures(&c)?;
    let notes = format!(
        "{kills} SIGKILLs ({leader_kills} of the leader) in {load_s:.0} s of load ({:.0} saves/s)",
        saved.saves as f64 / load_s
    );
    settle(
        sys,
        "1 relay SIGKILLs",
        &before,
        &saved,
        Instant::now(),
        notes,
    )
    .await
}

/// Saves one order and waits for 1C to have it; returns how long that took.
async fn probe(sys: &System, c: &Client, id: &str) -> Result<Duration> {
    c.save(id, &testkit::sample_order(id)).await?;
    let started = Instant::now();
    loop {
        let res = sys
            .http
            .get(format!("{}/hs/orders/v1/orders/{id}", sys.mock.url))
            .basic_auth("orders-center", Some(ONEC_PASSWORD))
            .send()
            .await?;
        if res.status() == 200 {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{id} never reached 1C"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// 2. `pg_ctl restart -m fast` under load: the API answers 503 problem+json
///    (never a 500 or a hang), and the relays reconnect and LISTEN again.
pub async fn database_restart(sys: &mut System) -> Result<Figures> {
    let before = sys.mock_stats().await?;
    let c = client(sys);
    let load = tokio::spawn({
        let c = c.clone();
        async move { saves(&c, "PGRS", 3000, 16).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down = Instant::now();
    tokio::task::block_in_place(|| sys.pg.restart_fast())?;
    let restart = down.elapsed();
    let saved = load.await??;
    let tally = ensure_only_promised_failures(&c)?;
    ensure!(
        tally.slowest < Duration::from_secs(10),
        "an answer took {:?}: the API hung",
        tally.slowest
    );
    sys.drained(Duration::from_secs(60)).await?;
    // With polling every 5 s, only a working LISTEN explains deliveries this fast.
    let mut wakes = Vec::new();
    for n in 0..5 {
        wakes.push(probe(sys, &c, &format!("PGRS-probe-{n}")).await?);
    }
    wakes.sort();
    let median = wakes[2];
    ensure!(
        median < Duration::from_millis(1000),
        "after the restart deliveries waited for the poll ({median:?}): LISTEN was not restored"
    );
    let notes = format!(
        "restart took {:.1} s; {} answers 503 problem+json, {} refused connections, 0 others; \
         slowest answer {:.2} s; commit to 1C after the restart, median of 5: {} ms",
        restart.as_secs_f64(),
        tally.unavailable,
        tally.connection_errors,
        tally.slowest.as_secs_f64(),
        median.as_millis()
    );
    let mut probes = saved;
    for n in 0..5 {
        probes.versions.insert(format!("PGRS-probe-{n}"), 1);
    }
    settle(
        sys,
        "2 PostgreSQL restart",
        &before,
        &probes,
        Instant::now(),
        notes,
    )
    .await
}

/// 3. 1C answers 503 to everything for 30 s, then recovers.
pub async fn onec_outage(sys: &mut System, outage: Duration) -> Result<Figures> {
    let before = sys.mock_stats().await?;
    sys.set_faults(json!({"outage": true})).await?;
    let down = Instant::now();
    let c = client(sys);
    let saved = saves(&c, "OUTAGE", 1500, 8).await?;
    let (mut breaker_open, mut dead_during) = (0f64, 0);
    while down.elapsed() < outage {
        breaker_open = breaker_open.max(
            sys.relay_metric_max("orders_center_sink_breaker_state", &[])
                .await?,
        );
        dead_during = dead_during.max(sys.backlog().await?.dead);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pending_at_end = sys.backlog().await?.pending;
    sys.set_faults(json!({})).await?;
    let up = Instant::now();
    ensure!(
        breaker_open >= 1.0,
        "the breaker never opened during the outage"
    );
    ensure!(
        dead_during == 0,
        "{dead_during} tasks went dead during the outage"
    );
    ensure_only_promised_failures(&c)?;
    let notes = format!(
        "{}s outage: breaker opened, {pending_at_end} tasks waiting at its end, 0 dead",
        outage.as_secs()
    );
    settle(sys, "3 1C outage", &before, &saved, up, notes).await
}

/// 4. 20% of 1C's answers take longer than the relay's 1 s timeout. 1C
///    still applies those, late; the in-doubt hold keeps newer versions of
///    the order back until then, so nothing lands stale.
pub async fn slow_onec(sys: &mut System) -> Result<Figures> {
    let before = sys.mock_stats().await?;
    sys.set_faults(json!({"slow_rate": 0.2, "slow_ms": 1500}))
        .await?;
    let c = client(sys);
    let saved = saves(&c, "SLOW", 2000, 16).await?;
    let timeouts = sys
        .relay_metric_max(
            "orders_center_outbox_failed_total",
            &[r#"destination="onec""#, r#"class="timeout""#],
        )
        .await?;
    sys.drained(Duration::from_secs(120)).await?;
    sys.set_faults(json!({})).await?;
    ensure_only_promised_failures(&c)?;
    let notes = format!("relay timeouts (largest count of one relay): {timeouts}");
    settle(sys, "4 slow 1C", &before, &saved, Instant::now(), notes).await
}

/// 5. Writers race on the same orders with `If-Match`: every success bumps
///    the version by one, every loser gets 412, and no update is lost.
pub async fn conflicting_saves(sys: &mut System) -> Result<Figures> {
    const ORDERS: usize = 20;
    const WRITERS: usize = 8;
    const ROUNDS: usize = 40;
    let before = sys.mock_stats().await?;
    let c = client(sys);
    let mut saved = Saved::default();
    for n in 0..ORDERS {
        let id = format!("IFM-{n}");
        saved
            .versions
            .insert(id.clone(), c.save(&id, &testkit::sample_order(&id)).await?);
        saved.saves += 1;
    }
    let writers = (0..WRITERS).map(|w| {
        let (http, api) = (sys.http.clone(), sys.api.url.clone());
        tokio::spawn(async move {
            let mut won: HashMap<String, u64> = HashMap::new();
            let mut lost_races = 0u64;
            for r in 0..ROUNDS {
                let id = format!("IFM-{}", (w * 7 + r * 3) % ORDERS);
                let url = format!("{api}/api/v1/orders/{id}");
                let current = http.get(&url).bearer_auth(API_TOKEN).send().await?;
                let etag = current.headers()["etag"].to_str()?.to_owned();
                let body = testkit::sample_order_with(&id, "new", (w * 1000 + r) as f64);
                let res = http
                    .put(&url)
                    .bearer_auth(API_TOKEN)
                    .header("if-match", etag)
                    .json(&body)
                    .send()
                    .await?;
                match res.status().as_u16() {
                    200 => *won.entry(id).or_default() += 1,
                    412 => lost_races += 1,
                    s => anyhow::bail!("If-Match save answered {s}"),
                }
            }
            Ok::<_, anyhow::Error>((won, lost_races))
        })
    });
    let mut wins: HashMap<String, u64> = HashMap::new();
    let mut races_lost = 0;
    for w in futures::future::join_all(writers).await {
        let (won, lost) = w??;
        races_lost += lost;
        for (id, n) in won {
            *wins.entry(id).or_default() += n;
        }
    }
    let total_wins: u64 = wins.values().sum();
    for n in 0..ORDERS {
        let id = format!("IFM-{n}");
        let version: i64 = sqlx::query_scalar("SELECT version FROM orders WHERE id = $1")
            .bind(&id)
            .fetch_one(&sys.pool)
            .await
            .context("reading the raced order")?;
        let expected = 1 + wins.get(&id).copied().unwrap_or_default() as i64;
        ensure!(
            version == expected,
            "{id}: version {version} after {expected} confirmed saves: an update was lost or invented"
        );
        saved.versions.insert(id, version);
    }
    saved.saves += total_wins;
    let notes = format!(
        "{} conditional saves: {total_wins} won (each exactly one version), {races_lost} answered 412",
        WRITERS * ROUNDS
    );
    settle(
        sys,
        "5 If-Match races",
        &before,
        &saved,
        Instant::now(),
        notes,
    )
    .await
}

/// 6. SIGTERM every relay under load: deliveries in flight finish or are
///    released at once, so a restarted relay drains everything without
///    waiting for a claim to expire (leases are 120 s here).
pub async fn graceful_stop(sys: &mut System) -> Result<Figures> {
    sys.restart_relays_with(&[("RELAY_CLAIM_LEASE", "120s")])
        .await?;
    let before = sys.mock_stats().await?;
    sys.set_faults(json!({"latency_ms": 20})).await?;
    let c = client(sys);
    let load = tokio::spawn({
        let c = c.clone();
        async move { saves(&c, "TERM", 3000, 16).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut slowest_stop = Duration::ZERO;
    for i in 0..RELAYS {
        slowest_stop = slowest_stop.max(sys.stop_relay(i).await?);
    }
    let running = sys.backlog().await?.running;
    ensure!(
        running == 0,
        "{running} tasks still claimed after every relay stopped"
    );
    let saved = load.await??;
    let restarted = Instant::now();
    for i in 0..RELAYS {
        sys.start_relay(i).await?;
    }
    sys.set_faults(json!({})).await?;
    let drained = sys.drained(Duration::from_secs(100)).await?;
    ensure!(
        drained < Duration::from_secs(100),
        "the drain waited for claims to expire"
    );
    ensure_only_promised_failures(&c)?;
    let notes = format!(
        "slowest relay stop {:.2} s; 0 tasks left claimed; all drained {:.1} s after restart (claim lease 120 s)",
        slowest_stop.as_secs_f64(),
        drained.as_secs_f64()
    );
    settle(
        sys,
        "6 SIGTERM under load",
        &before,
        &saved,
        restarted,
        notes,
    )
    .await
}

/// 7. 1,000 orders wait out the in-doubt hold: 1C never answers their first
///    version in time, and a second version of each is queued behind it.
///    Fresh orders, saved under load meanwhile, must still reach 1C at the
///    usual latency: held versions take no place in the relays' claims.
pub async fn held_orders(sys: &mut System) -> Result<Figures> {
    const HELD: usize = 1000;
    const PROBES: usize = 50;
    // A hold that outlasts the probes, so no held version goes out (and
    // takes delivery capacity for its 1 s timeout) while they run, and a
    // breaker that does not open on the timeouts: the hold is what the
    // probes meet.
    sys.restart_relays_with(&[
        ("ONEC_IN_DOUBT", "60s"),
        ("ONEC_BREAKER_FAILURES", "1000000"),
    ])
    .await?;
    let before = sys.mock_stats().await?;
    sys.set_faults(json!({"slow_prefix": "HELD-", "slow_ms": 1500}))
        .await?;
    let c = client(sys);
    let mut saved = Saved::default();
    for round in 0..2 {
        let ids: Vec<String> = (0..HELD).map(|n| format!("HELD-{n}")).collect();
        let versions: Vec<Result<(String, i64)>> = futures::stream::iter(ids)
            .map(|id| {
                let c = c.clone();
                async move {
                    let mut body = testkit::sample_order(&id);
                    body["order"]["price"] = json!(100 + round);
                    let v = c.save(&id, &body).await?;
                    Ok((id, v))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for v in versions {
            let (id, version) = v?;
            saved.versions.insert(id, version);
            saved.saves += 1;
        }
        // First every version 1 has had its unanswered attempt; then every
        // version 2 waits behind it, parked until the hold ends, and the
        // retries of version 1 are superseded, so no held order takes
        // delivery capacity while the probes run.
        let (what, sql) = if round == 0 {
            (
                "orders in doubt",
                "SELECT count(*) FROM outbox
                 WHERE aggregateid LIKE 'HELD-%' AND in_doubt_until > now()",
            )
        } else {
            (
                "held versions parked",
                "SELECT count(*) FROM outbox
                 WHERE aggregateid LIKE 'HELD-%' AND version = 2 AND state = 'pending'
                   AND run_at > now() + interval '10 seconds'",
            )
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&sys.pool).await?;
            if n >= HELD as i64 {
                break;
            }
            ensure!(Instant::now() < deadline, "only {n} {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let load = tokio::spawn({
        let c = c.clone();
        async move { saves(&c, "BESIDE", 2000, 8).await }
    });
    let mut latencies = Vec::with_capacity(PROBES);
    for n in 0..PROBES {
        latencies.push(probe(sys, &c, &format!("FRESH-{n}")).await?);
    }
    let beside = load.await??;
    let still_held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox
         WHERE aggregateid LIKE 'HELD-%' AND version = 2 AND state = 'pending'",
    )
    .fetch_one(&sys.pool)
    .await?;
    latencies.sort();
    let p50 = latencies[PROBES / 2];
    let p99 = latencies[PROBES * 99 / 100];
    let max = latencies[PROBES - 1];
    ensure!(
        still_held > 0,
        "the held versions were no longer held while the probes ran"
    );
    ensure!(
        p99 < Duration::from_secs(1),
        "fresh orders starved behind held ones: p50 {p50:?}, p99 {p99:?}; all {latencies:?}"
    );

    let released = Instant::now();
    sys.set_faults(json!({})).await?;
    sys.clear_relay_env(&["ONEC_IN_DOUBT", "ONEC_BREAKER_FAILURES"]);
    sys.restart_relays_with(&[]).await?;
    saved.saves += beside.saves;
    saved.versions.extend(beside.versions);
    ensure_only_promised_failures(&c)?;
    let notes = format!(
        "{still_held} versions held behind {HELD} unanswered attempts; fresh order to 1C \
         under load: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({PROBES} probes)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    settle(sys, "7 held orders", &before, &saved, released, notes).await
}

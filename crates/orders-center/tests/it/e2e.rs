//! The whole system as separate processes: the built `onec-mock`, one `api`
//! and three `relay`s on one database. Orders are saved and updated through
//! the API, and 1C must end up with every order at its latest version,
//! each version applied once, and never an older one after a newer one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::support::{get_json, get_text, promtool_check_metrics, sample_sum, System};

/// The heavy scenarios share two cores; running them one at a time keeps
/// each one's timing honest.
pub(crate) static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const ORDERS: usize = 5_000;
const UPDATED: usize = 1_000;

struct Outcome {
    mock: Value,
    /// `/metrics` of the API, each relay and the mock, at the end.
    api_metrics: String,
    relay_metrics: Vec<String>,
    mock_metrics: String,
    done: i64,
    dead: i64,
    drained_in: Duration,
}

async fn run_scenario(mock_faults: &[&str]) -> Outcome {
    let db = testkit::unmigrated_database().await;
    let system = System::start(&db.url, mock_faults, 3).await;
    let (api, mock, relays) = (&system.api, &system.mock, &system.relays);
    let http = reqwest::Client::new();
    let save = |id: String, status: &'static str| {
        let (http, url) = (http.clone(), api.url.clone());
        async move {
            let body = testkit::sample_order_with(&id, status, 150.5);
            let res = http
                .put(format!("{url}/api/v1/orders/{id}"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "save {id}: {}", res.status());
        }
    };
    let started = Instant::now();
    futures::stream::iter((0..ORDERS).map(|i| save(format!("E2E-{i:05}"), "new")))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    futures::stream::iter(
        (0..UPDATED).map(|i| save(format!("E2E-{:05}", i * (ORDERS / UPDATED)), "paid")),
    )
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    println!(
        "{} saves through the API in {:?}",
        ORDERS + UPDATED,
        started.elapsed()
    );

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state IN ('pending', 'running')")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} tasks still open\nrelay-0:\n{}\nmock:\n{}",
            relays[0].tail(),
            mock.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_in = started.elapsed();

    let stats: Value = get_json(&format!("{}/stats", mock.url)).await;
    let held: HashMap<String, i64> = get_json(&format!("{}/admin/orders", mock.url)).await;
    let latest: Vec<(String, i64)> = sqlx::query_as("SELECT id, version FROM orders")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(latest.len(), ORDERS);
    for (id, version) in &latest {
        assert_eq!(
            held.get(id),
            Some(version),
            "1C holds the wrong version of {id}"
        );
    }
    let count = |state: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE state = $1")
                .bind(state)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (done, dead) = (count("done").await, count("dead").await);
    let api_metrics = get_text(&format!("{}/metrics", api.url)).await;
    let mock_metrics = get_text(&format!("{}/metrics", mock.url)).await;
    let mut relay_metrics = Vec::new();
    for relay in relays {
        relay_metrics.push(get_text(&format!("{}/metrics", relay.url)).await);
    }
    let leading = relay_metrics
        .iter()
        .filter(|m| m.lines().any(|l| l == "orders_center_relay_is_leader 1"))
        .count();
    assert_eq!(leading, 1, "exactly one of the three relays leads");

    system.stop().await;
    Outcome {
        mock: stats,
        api_metrics,
        relay_metrics,
        mock_metrics,
        done,
        dead,
        drained_in,
    }
}

#[tokio::test]
async fn three_relays_deliver_every_order_at_its_latest_version_exactly_once() {
    let _one = ONE_AT_A_TIME.lock().await;

    let o = run_scenario(&[]).await;

    println!(
        "clean run: drained in {:?}, 1C stats {}",
        o.drained_in, o.mock
    );
    assert_eq!(o.mock["stale"], 0);
    assert_eq!(o.mock["duplicates"], 0);
    assert_eq!(o.dead, 0);
    assert_eq!(
        o.mock["applied"], o.done,
        "each version sent was applied once"
    );
    assert!(
        o.done >= ORDERS as i64 && o.done <= (ORDERS + UPDATED) as i64,
        "{}",
        o.done
    );
    assert_eq!(o.mock["orders"], ORDERS);

    // The real expositions lint clean, and their counters tell what happened.
    promtool_check_metrics("api", &o.api_metrics);
    promtool_check_metrics("onec-mock", &o.mock_metrics);
    for (i, m) in o.relay_metrics.iter().enumerate() {
        promtool_check_metrics(&format!("relay-{i}"), m);
    }
    let saved = sample_sum(&o.api_metrics, "orders_center_orders_saved_total");
    let enqueued = sample_sum(&o.api_metrics, "orders_center_outbox_enqueued_total");
    assert_eq!(saved, (ORDERS + UPDATED) as f64);
    assert_eq!(saved, enqueued, "every save enqueued one task");
    let delivered: f64 = o
        .relay_metrics
        .iter()
        .map(|m| sample_sum(m, "orders_center_outbox_delivered_total"))
        .sum();
    let n = |k: &str| o.mock[k].as_f64().unwrap();
    assert_eq!(delivered, n("applied") + n("duplicates") + n("stale"));
    assert_eq!(
        sample_sum(&o.mock_metrics, "onec_mock_applied_total"),
        n("applied")
    );
}

#[tokio::test]
async fn with_a_failing_slow_1c_the_end_state_is_the_same_and_duplicates_are_absorbed() {
    let _one = ONE_AT_A_TIME.lock().await;

    let o = run_scenario(&[
        "--error-rate",
        "0.2",
        "--fail-after-apply",
        "0.5",
        "--latency",
        "2ms",
    ])
    .await;

    println!(
        "faulty run: drained in {:?}, 1C stats {}",
        o.drained_in, o.mock
    );
    let n = |k: &str| o.mock[k].as_i64().unwrap();
    assert_eq!(n("stale"), 0);
    assert_eq!(o.dead, 0);
    assert_eq!(n("orders"), ORDERS as i64);
    assert!(n("injected_errors") > 0);
    // A lost answer is retried and absorbed as a duplicate, unless a newer
    // save superseded the version first: then 1C applied a version whose
    // task ends superseded rather than done.
    assert!(n("duplicates") > 0, "lost answers come back as duplicates");
    assert!(n("duplicates") <= n("responses_lost"));
    assert!(
        (o.done..=o.done + n("responses_lost")).contains(&n("applied")),
        "applied {} vs done {}",
        n("applied"),
        o.done
    );
}

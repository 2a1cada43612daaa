use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    get_json, line_containing, lines, orders_center, stop, url_in, wait_healthy, workspace_root,
};

const README_API: &str = "http://127.0.0.1:8080";
const README_MOCK: &str = "http://127.0.0.1:8081";
const README_INVENTORY: &str = "http://127.0.0.1:8082";
const README_PAYMENTS: &str = "http://127.0.0.1:8083";
const README_NOTIFIER: &str = "http://127.0.0.1:8084";

/// The curl commands between the README's tour markers, one per line.
fn readme_tour() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let start = readme
        .find("<!-- tour:start -->")
        .expect("tour start marker");
    let end = readme.find("<!-- tour:end -->").expect("tour end marker");
    readme[start..end]
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .map(str::to_owned)
        .collect()
}

/// A new user's first run: `orders-center dev` with no DATABASE_URL starts its
/// own PostgreSQL, serves /healthz within 30 s, the README's curl tour works
/// against it, and Ctrl-C stops everything and removes the throwaway files.
#[tokio::test]
async fn dev_mode_serves_within_30s_runs_the_readme_tour_and_cleans_up_on_ctrl_c() {
    let started = Instant::now();
    let mut dev = orders_center(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--relay-listen",
        "127.0.0.1:0",
        "--onec-mock-listen",
        "127.0.0.1:0",
        "--inventory-listen",
        "127.0.0.1:0",
        "--payments-listen",
        "127.0.0.1:0",
        "--notifier-listen",
        "127.0.0.1:0",
    ])
    .spawn()
    .unwrap();
    let mut out = lines(dev.stdout.take());
    let api_line = line_containing(&mut out, "API ", Duration::from_secs(30)).await;
    let base = url_in(&api_line)
        .trim_end_matches("/api/v1/orders")
        .to_owned();
    let mock_line = line_containing(&mut out, "1C mock", Duration::from_secs(5)).await;
    let mock = url_in(&mock_line).trim_end_matches("/stats").to_owned();
    let mut services = Vec::new();
    for name in ["inventory", "payments", "notifier"] {
        services.push(url_in(
            &line_containing(&mut out, name, Duration::from_secs(5)).await,
        ));
    }
    let [inventory, payments, notifier]: [String; 3] = services.try_into().unwrap();
    let pg_line = line_containing(&mut out, "PostgreSQL", Duration::from_secs(5)).await;
    let throwaway = pg_line
        .split("throwaway in ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("dev started its own PostgreSQL")
        .to_owned();
    assert!(std::path::Path::new(&throwaway).is_dir());

    wait_healthy(
        &format!("{base}/healthz"),
        started + Duration::from_secs(30),
    )
    .await;

    let tour = readme_tour();
    assert!(
        tour.len() >= 8,
        "the README tour has {} curl commands",
        tour.len()
    );
    let mut outputs = Vec::new();
    for command in &tour {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(
                command
                    .replace(README_API, &base)
                    .replace(README_MOCK, &mock)
                    .replace(README_INVENTORY, &inventory)
                    .replace(README_PAYMENTS, &payments)
                    .replace(README_NOTIFIER, &notifier),
            )
            .current_dir(workspace_root())
            .output()
            .await
            .expect("curl is installed");
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8(out.stdout).unwrap());
    }
    let all = outputs.join("\n");
    assert!(
        all.contains(r#""status":412"#),
        "the tour shows a stale If-Match: {all}"
    );
    assert!(
        all.contains(r#""status":422"#),
        "the tour shows a validation problem: {all}"
    );

    let order: Value = get_json(&format!("{base}/api/v1/orders/ORD-1001")).await;
    let example: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("examples/order.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(order["order"]["general_id"], example["order"]["general_id"]);
    let money = |v: &Value| serde_json::from_value::<domain::Money>(v.clone()).unwrap();
    assert_eq!(
        money(&order["order"]["price"]),
        money(&example["order"]["price"])
    );
    assert_eq!(order["items"].as_array().unwrap().len(), 2);
    assert_eq!(order["payments"][1]["credit_data"], {
        let mut c = example["payments"][1]["credit_data"].clone();
        c["pay_sum_per_month"] = Value::from(8333.33);
        c
    });
    assert_eq!(
        order["order"]["status"], "paid",
        "the tour changes the status"
    );
    assert_eq!(order["version"], 2);
    assert_eq!(order["history"].as_array().unwrap().len(), 3);

    // The relay delivered the latest version to the 1C mock.
    let mut held = serde_json::Value::Null;
    for _ in 0..100 {
        held = get_json(&format!("{mock}/admin/orders")).await;
        if held["ORD-1001"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held["ORD-1001"], 2, "1C holds {held}");
    let stats: Value = get_json(&format!("{base}/api/v1/sync/stats")).await;
    assert_eq!(stats["pending"], 0, "{stats}");

    // With no broker, the journal consumer is fed from the log: it has the
    // order's events, one per version, in version order; the update that
    // changed the status says from what.
    let db_url = pg_line
        .split_whitespace()
        .nth(1)
        .expect("the PostgreSQL URL");
    let pool = sqlx::PgPool::connect(db_url).await.unwrap();
    let mut journal: Vec<(i64, String, Option<String>, String)> = Vec::new();
    for _ in 0..100 {
        journal = sqlx::query_as(
            "SELECT version, type, previous_status, status FROM order_journal
             WHERE order_id = 'ORD-1001' ORDER BY seq",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if journal.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let more: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_journal WHERE order_id = 'ORD-1001'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(more, 2, "one event per version: {journal:?}");
    let journal: Vec<_> = journal
        .iter()
        .map(|(v, t, p, s)| (*v, t.as_str(), p.as_deref(), s.as_str()))
        .collect();
    assert_eq!(journal[0], (1, "order.created", None, journal[0].3));
    assert_eq!(journal[1].0, 2);
    assert_eq!(journal[1].1, "order.updated");
    assert_ne!(journal[1].3, journal[0].3, "the tour changes the status");
    assert_eq!(journal[1].2, Some(journal[0].3), "{journal:?}");
    pool.close().await;

    // The tour's two sagas end completed and cancelled, with their chains,
    // and stock, money and notifications show it.
    let chain = |id: &'static str| {
        let base = base.clone();
        async move {
            let steps: Value = get_json(&format!("{base}/api/v1/orders/{id}/states")).await;
            steps
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["step"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let (mut completed, mut cancelled) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        completed = chain("ORD-2001").await;
        cancelled = chain("ORD-2002").await;
        if completed.last().map(String::as_str) == Some("ORDER_COMPLETED")
            && cancelled.last().map(String::as_str) == Some("ORDER_CANCELLED")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        completed,
        [
            "ORDER_CREATED",
            "RESERVE_CREATED",
            "PAYMENT_CREATED",
            "PAYMENT_COMPLETED",
            "RESERVE_COMMITTED",
            "ORDER_COMPLETED"
        ]
    );
    assert_eq!(
        cancelled,
        [
            "ORDER_CREATED",
            "RESERVE_CREATED",
            "PAYMENT_CREATED",
            "PAYMENT_FAILED",
            "RESERVE_RELEASED",
            "ORDER_CANCELLED"
        ]
    );
    let order: Value = get_json(&format!("{base}/api/v1/orders/ORD-2001")).await;
    assert_eq!(order["order"]["status"], "completed");
    // The OrderCompleted that sells the stock goes out with the last step.
    let mut stock = Value::Null;
    for _ in 0..100 {
        stock = get_json(&format!("{inventory}/api/v1/stock/SKU-1")).await;
        if stock["sold"].as_i64() == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (
            stock["available"].as_i64(),
            stock["reserved"].as_i64(),
            stock["sold"].as_i64()
        ),
        (Some(8), Some(0), Some(2))
    );
    let account: Value = get_json(&format!("{payments}/api/v1/accounts/acc-1")).await;
    assert_eq!(account["balance"].to_string(), "749.5");
    // The notifications go out after the chains end: wait for both.
    let mut notes = Value::Null;
    for _ in 0..100 {
        notes = get_json(&format!("{notifier}/api/v1/notifications")).await;
        if notes.as_array().map_or(0, Vec::len) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes: Vec<(&str, &str)> = notes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["order_id"].as_str().unwrap(),
                n["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(outcomes.len(), 2, "{notes}");
    assert!(outcomes.contains(&("ORD-2001", "completed")));
    assert!(outcomes.contains(&("ORD-2002", "cancelled")));

    stop(&mut dev, "INT", Duration::from_secs(15)).await;
    assert!(
        !std::path::Path::new(&throwaway).exists(),
        "{throwaway} left behind"
    );
}

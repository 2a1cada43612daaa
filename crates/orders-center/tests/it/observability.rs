//! Traces and metrics of the deployed shape: the trace id of a save reaches
//! 1C, and a real Prometheus server scrapes every role while orders flow, and
//! runs every dashboard query and alert rule against what it scraped.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{get_json, orders_center, stop, workspace_root, Role, System};

#[tokio::test]
async fn the_trace_id_of_a_save_is_the_one_1c_receives() {
    let db = testkit::unmigrated_database().await;
    let system = System::start(&db.url, &[], 1).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";

    let saved = reqwest::Client::new()
        .put(format!("{}/api/v1/orders/TRACED-1", system.api.url))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&testkit::sample_order("TRACED-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 201);
    let url = format!("{}/admin/orders/TRACED-1/traces", system.mock.url);
    let deadline = Instant::now() + Duration::from_secs(10);
    let received: Value = loop {
        let res = reqwest::get(&url).await.unwrap();
        if res.status() == 200 {
            break res.json().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the order never reached the mock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    system.stop().await;

    assert_eq!(received["trace_ids"], serde_json::json!([trace]));
}

/// Every PromQL expression of the dashboard, and of the alert rules.
fn expressions() -> (Vec<String>, Vec<String>) {
    let dir = workspace_root().join("observability");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dashboard.json")).unwrap())
            .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let dash = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "30s")
        })
        .collect();
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    // The rules file is YAML; its `expr:` values are one-line or `>` folded.
    let mut alerts = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(expr) = line.trim().strip_prefix("expr:") else {
            continue;
        };
        let expr = expr.trim();
        if expr == ">" {
            let mut folded = Vec::new();
            while let Some(next) = lines.peek() {
                if next.trim().is_empty()
                    || next.trim_start().starts_with("for:")
                    || next.trim_start().starts_with("labels:")
                {
                    break;
                }
                folded.push(lines.next().unwrap().trim().to_owned());
            }
            alerts.push(folded.join(" "));
        } else {
            alerts.push(expr.to_owned());
        }
    }
    (dash, alerts)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn host(url: &str) -> &str {
    url.trim_start_matches("http://")
}

#[tokio::test]
async fn prometheus_scrapes_every_role_and_every_dashboard_and_alert_query_works() {
    let (dashboard, alerts) = expressions();
    assert!(
        dashboard.len() >= 20 && alerts.len() >= 8,
        "{} / {}",
        dashboard.len(),
        alerts.len()
    );
    let db = testkit::unmigrated_database().await;
    // Order events go to a real RabbitMQ and a journal consumer reads them,
    // so the consumer panels and rules have series too.
    let rabbit = testkit::rabbitmq().await;
    let prefix = testkit::unique_prefix("obs");
    // Sagas on, and an orchestrator, so the saga panels and rules have
    // series as well.
    let broker = [
        ("BROKER", rabbit.url()),
        ("BROKER_PREFIX", prefix),
        ("SAGAS", "true".to_owned()),
    ];
    let broker: Vec<(&str, &str)> = broker.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Some failures, so the error panels have series to show.
    let system = System::start_with_env(
        &db.url,
        &["--error-rate", "0.1", "--retry-after-secs", "0"],
        2,
        &broker,
    )
    .await;
    let mut consumer = Role::spawn(
        orders_center(&["consume", "journal", "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &db.url)
            .envs(broker.iter().copied()),
        "consumer started",
    )
    .await;
    let mut orchestrator = Role::spawn(
        orders_center(&["consume", "saga", "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &db.url)
            .envs(broker.iter().copied()),
        "consumer started",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [{rules}]\n\
         scrape_configs:\n\
         - job_name: api\n  static_configs: [{{targets: ['{api}']}}]\n\
         - job_name: relay\n  static_configs: [{{targets: ['{r0}', '{r1}']}}]\n\
         - job_name: onec-mock\n  static_configs: [{{targets: ['{mock}']}}]\n\
         - job_name: consumer\n  static_configs: [{{targets: ['{consumer}', '{orchestrator}']}}]\n",
        rules = workspace_root().join("observability/alerts.yml").display(),
        api = host(&system.api.url),
        r0 = host(&system.relays[0].url),
        r1 = host(&system.relays[1].url),
        mock = host(&system.mock.url),
        consumer = host(&consumer.url),
        orchestrator = host(&orchestrator.url),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (apt-get install prometheus; .ci/run does)");
    let prom = format!("http://127.0.0.1:{port}");

    // Orders flow for 15 s: 20 saves a second, some of them updates.
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(15) {
        let id = format!("FLOW-{}", i % 200);
        let res = http
            .put(format!("{}/api/v1/orders/{id}", system.api.url))
            .json(&testkit::sample_order(&id))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success());
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let targets: Value = get_json(&format!("{prom}/api/v1/targets")).await;
    let health: Vec<&str> = targets["data"]["activeTargets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["health"].as_str().unwrap())
        .collect();
    assert_eq!(health, ["up"; 6], "{targets}");

    let query = |expr: String| {
        let (http, prom) = (http.clone(), prom.clone());
        async move {
            let res = http
                .get(format!("{prom}/api/v1/query"))
                .query(&[("query", &expr)])
                .send()
                .await
                .unwrap();
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["status"], "success", "{expr}: {body}");
            body["data"]["result"].as_array().unwrap().len()
        }
    };
    for expr in &dashboard {
        assert!(
            query(expr.clone()).await > 0,
            "dashboard query returned no data: {expr}"
        );
    }
    let mut names = BTreeSet::new();
    for expr in &alerts {
        query(expr.clone()).await;
        names.extend(
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("orders_center_"))
                .map(str::to_owned),
        );
    }
    for name in &names {
        let series = query(format!("count({{__name__=\"{name}\"}})")).await;
        assert!(series > 0, "alert rules use {name}, which no role exposes");
    }
    // Prometheus itself evaluated every rule without error.
    let rules: Value = get_json(&format!("{prom}/api/v1/rules")).await;
    let evaluated: Vec<(String, String)> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["health"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(evaluated.len(), alerts.len());
    assert!(evaluated.iter().all(|(_, h)| h == "ok"), "{evaluated:?}");

    stop(&mut consumer.child, "TERM", Duration::from_secs(15)).await;
    stop(&mut orchestrator.child, "TERM", Duration::from_secs(15)).await;
    system.stop().await;
}

//! The `OutboxRelay` resource end to end, as a cluster runs it: a real
//! kube-apiserver (etcd and the API server on loopback, RBAC on), the
//! generated CRD, the chart's relay ServiceAccount, Role, RoleBinding and
//! default `OutboxRelay`, and three `orders-center relay` processes acting
//! as that ServiceAccount (its token, nothing more) on a real PostgreSQL,
//! electing their leader through the chart's Lease.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ephemeral_infra::KubeApi;
use futures::StreamExt;
use serde_json::Value;

use crate::support::{get_text, sample_sum, workspace_root, Role, System};

const NAMESPACE: &str = "orders";
const RESOURCE: &str = "orders-center-onec";
const LEASE: (Duration, Duration) = (Duration::from_secs(3), Duration::from_secs(2));

fn api_server() -> &'static KubeApi {
    static SERVER: OnceLock<KubeApi> = OnceLock::new();
    SERVER.get_or_init(|| KubeApi::start().expect("a throwaway kube-apiserver"))
}

/// `kubectl args` as the cluster's admin, with `stdin`; its stdout.
fn kubectl(api: &KubeApi, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = api
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The relay's objects of the chart, rendered with its default values.
fn chart(kinds: &[&str]) -> String {
    let root = workspace_root();
    let python = root.join(".venv-tools/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test once",
        python.display()
    );
    let out = Command::new(python)
        .arg(root.join("tests/deploy/render.py"))
        .args(kinds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A kubeconfig for the API server that authenticates with `token` alone.
fn kubeconfig_with_token(api: &KubeApi, token: &str, path: &std::path::Path) {
    let mut config = kube::config::Kubeconfig::read_from(api.kubeconfig()).unwrap();
    for user in &mut config.auth_infos {
        let auth = user.auth_info.get_or_insert_with(Default::default);
        *auth = kube::config::AuthInfo {
            token: Some(token.to_owned().into()),
            ..Default::default()
        };
    }
    // JSON is YAML: kubeconfig readers take it.
    std::fs::write(path, serde_json::to_vec(&config).unwrap()).unwrap();
}

fn status(api: &KubeApi) -> Value {
    let out = kubectl(
        api,
        &["get", "obr", RESOURCE, "-n", NAMESPACE, "-o", "json"],
        None,
    );
    serde_json::from_str::<Value>(&out).unwrap()["status"].clone()
}

fn condition(status: &Value, type_: &str) -> String {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .map_or_else(String::new, |c| c["status"].as_str().unwrap().to_owned())
}

/// Waits until the status satisfies `ok`; how long it took.
async fn wait_status(
    api: &KubeApi,
    what: &str,
    limit: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let s = status(api);
        if ok(&s) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; status {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kubectl patch` of `spec.paused`, as an operator types it.
fn set_paused(api: &KubeApi, paused: bool) {
    let patch = format!(r#"{{"spec":{{"paused":{paused}}}}}"#);
    kubectl(
        api,
        &[
            "patch", "obr", RESOURCE, "-n", NAMESPACE, "--type", "merge", "-p", &patch,
        ],
        None,
    );
}

fn table(api: &KubeApi) -> String {
    kubectl(api, &["get", "obr", "-n", NAMESPACE], None)
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A relay's `relay-N` name, from its first log line.
fn relay_id(relay: &Role) -> String {
    let first = relay.log.lock().unwrap()[0].clone();
    first
        .split("relay_id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the first line names the relay")
        .to_owned()
}

/// Status writes each relay sent, by its `relay-N` name.
async fn status_writes(system: &System) -> BTreeMap<String, f64> {
    let mut writes = BTreeMap::new();
    for relay in &system.relays {
        let name = relay_id(relay);
        let metrics = get_text(&format!("{}/metrics", relay.url)).await;
        writes.insert(
            name,
            sample_sum(&metrics, "orders_center_relay_status_writes_total"),
        );
    }
    writes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_are_steered_and_reported_through_the_charts_outbox_relay() {
    // Its timings (the pause, the hand-over) are bounded: not beside the
    // heavy scenarios.
    let _one = crate::e2e::ONE_AT_A_TIME.lock().await;
    let api = tokio::task::spawn_blocking(api_server).await.unwrap();
    let crd = crate::support::orders_center(&["crdgen"])
        .output()
        .await
        .unwrap();
    assert!(crd.status.success());
    kubectl(
        api,
        &["apply", "--server-side", "-f", "-"],
        Some(&String::from_utf8(crd.stdout).unwrap()),
    );
    kubectl(
        api,
        &[
            "wait",
            "--for=condition=Established",
            "crd/outboxrelays.orders-center.io",
            "--timeout=30s",
        ],
        None,
    );
    kubectl(api, &["create", "namespace", NAMESPACE], None);
    let objects = chart(&["ServiceAccount", "Role", "RoleBinding", "OutboxRelay"]);
    kubectl(
        api,
        &["apply", "--server-side", "-n", NAMESPACE, "-f", "-"],
        Some(&objects),
    );
    let token = kubectl(
        api,
        &[
            "create",
            "token",
            "orders-center-relay",
            "-n",
            NAMESPACE,
            "--duration",
            "2h",
        ],
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("relay.kubeconfig");
    kubeconfig_with_token(api, token.trim(), &kubeconfig);

    let db = testkit::unmigrated_database().await;
    let lease = [
        "--leader-election",
        "kube",
        "--lease-name",
        "orders-center-relay",
        "--lease-namespace",
        NAMESPACE,
        "--outbox-relay-resources",
        "--outbox-relay-namespace",
        NAMESPACE,
        "--outbox-relay-selector",
        "app.kubernetes.io/instance=orders-center",
    ];
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    let mut system = System::start_relays_with(&db.url, &[], 3, &env, &lease).await;

    // The leader fills the columns in.
    let took = wait_status(api, "the first status", Duration::from_secs(30), |s| {
        s["leader"].is_string()
            && s["backlog"] == 0
            && s["breaker"] == "Closed"
            && condition(s, "Ready") == "True"
    })
    .await;
    println!("first status {took:?} after start:\n{}", table(api));

    let http = reqwest::Client::new();
    let save = |id: String| {
        let (http, url) = (http.clone(), system.api.url.clone());
        async move {
            let res = http
                .put(format!("{url}/api/v1/orders/{id}"))
                .json(&testkit::sample_order_with(&id, "new", 150.5))
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "save {id}: {}", res.status());
        }
    };
    futures::stream::iter((0..10).map(|i| save(format!("OBR-W{i:02}"))))
        .buffer_unordered(10)
        .collect::<Vec<_>>()
        .await;
    wait_status(api, "10 delivered", Duration::from_secs(30), |s| {
        s["backlog"] == 0 && s["lastDelivery"].is_string()
    })
    .await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox WHERE state = 'done'").await,
        10
    );

    // A 1C maintenance window: pause, and save 1,000 orders meanwhile.
    // Timed from before kubectl starts: the relays apply the change before
    // the kubectl process has exited.
    let paused_at = Instant::now();
    set_paused(api, true);
    let applied = |system: &System| {
        system.relays.iter().all(|r| {
            r.log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("delivery settings changed") && l.contains("paused=true"))
        })
    };
    while !applied(&system) {
        assert!(
            paused_at.elapsed() < Duration::from_secs(10),
            "the pause did not reach every relay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pause_took = paused_at.elapsed();
    futures::stream::iter((0..1000).map(|i| save(format!("OBR-P{i:04}"))))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let took = wait_status(api, "the paused backlog", Duration::from_secs(30), |s| {
        s["backlog"] == 1000
            && condition(s, "Paused") == "True"
            && condition(s, "Ready") == "False"
            && s["oldestPending"].is_string()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox WHERE state = 'done'").await,
        10,
        "nothing delivered while paused"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE state = 'pending'"
        )
        .await,
        1000
    );
    println!("paused on every relay {pause_took:?} after kubectl patch; backlog 1000 in the status {took:?} after the saves:\n{}", table(api));

    let resumed_at = Instant::now();
    set_paused(api, false);
    while count(
        &db.pool,
        "SELECT count(*) FROM outbox WHERE state <> 'done'",
    )
    .await
        > 0
    {
        assert!(
            resumed_at.elapsed() < Duration::from_secs(60),
            "not delivered after the resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = resumed_at.elapsed();
    let took = wait_status(
        api,
        "backlog 0 after the resume",
        Duration::from_secs(30),
        |s| {
            s["backlog"] == 0
                && condition(s, "Paused") == "False"
                && condition(s, "Ready") == "True"
        },
    )
    .await;
    println!("resumed: 1,000 delivered {drained:?} after kubectl patch; backlog 0 in the status {took:?} later:\n{}", table(api));

    // Every relay's breaker is in the status, through the database.
    let breakers = status(api)["breakers"].clone();
    assert_eq!(
        breakers,
        serde_json::json!({"relay-0": "Closed", "relay-1": "Closed", "relay-2": "Closed"})
    );

    // Only the leader wrote the status; every call the relays made was allowed.
    let leader = status(api)["leader"].as_str().unwrap().to_owned();
    let writes = status_writes(&system).await;
    assert!(writes[&leader] > 0.0, "{writes:?}");
    assert!(
        writes.iter().all(|(name, n)| *name == leader || *n == 0.0),
        "a follower wrote: {writes:?}"
    );
    for relay in &system.relays {
        let log = relay.log.lock().unwrap().join("\n");
        assert!(
            !log.contains("forbidden") && !log.contains("cannot watch"),
            "{log}"
        );
    }

    // Kill the leader: its successor's name is in the status within the hand-over.
    let index = system
        .relays
        .iter()
        .position(|r| relay_id(r) == leader)
        .unwrap();
    let mut killed = system.relays.remove(index);
    killed.child.kill().await.unwrap();
    let bound = LEASE.0 + LEASE.1 + Duration::from_secs(1);
    let took = wait_status(api, "the new leader", Duration::from_secs(30), |s| {
        s["leader"].as_str().is_some_and(|l| l != leader)
    })
    .await;
    let successor = status(api)["leader"].as_str().unwrap().to_owned();
    println!("killed {leader}: {successor} in the status {took:?} later (lease {:?}, renew deadline {:?}):\n{}", LEASE.0, LEASE.1, table(api));
    assert!(took <= bound, "{took:?} > {bound:?}");
    let writes = status_writes(&system).await;
    assert!(
        writes
            .iter()
            .all(|(name, n)| *name == successor || *n == 0.0),
        "a follower wrote: {writes:?}"
    );

    // The leadership changes are Events on the resource.
    let events: Value = serde_json::from_str(&kubectl(
        api,
        &["get", "events.events.k8s.io", "-n", NAMESPACE, "-o", "json"],
        None,
    ))
    .unwrap();
    let elected: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "LeaderElected" && e["regarding"]["name"] == RESOURCE)
        .map(|e| e["note"].as_str().unwrap())
        .collect();
    assert!(
        elected
            .iter()
            .any(|n| n.starts_with(&format!("{leader} leads"))),
        "{elected:?}"
    );
    assert!(
        elected
            .contains(&format!("{successor} leads the relays of onec (after {leader})").as_str()),
        "{elected:?}"
    );

    println!(
        "{}",
        kubectl(api, &["get", "events.events.k8s.io", "-n", NAMESPACE], None)
    );
    system.stop().await;
}

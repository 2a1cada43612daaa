//! The `kube` lease backend against a real kube-apiserver (etcd and the API
//! server on loopback, built by `ephemeral-infra`): three relays elect one
//! leader through a real `coordination.k8s.io/v1` Lease, and a killed
//! leader is replaced within the lease duration plus the renew deadline.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ephemeral_infra::KubeApi;
use k8s_openapi::api::coordination::v1::Lease;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;
use worker::{ElectionConfig, Elector, KubeLease};

use crate::support::{leaders, wait_for_one_leader, Candidate};

/// One API server per test binary; its watchdog stops it when the binary exits.
fn api_server() -> &'static KubeApi {
    static SERVER: OnceLock<KubeApi> = OnceLock::new();
    SERVER.get_or_init(|| KubeApi::start().expect("a throwaway kube-apiserver"))
}

async fn client(namespace: &str) -> kube::Client {
    let api = tokio::task::spawn_blocking(api_server).await.unwrap();
    let status = api
        .kubectl()
        .args(["create", "namespace", namespace])
        .status()
        .unwrap();
    assert!(status.success(), "kubectl create namespace {namespace}");
    let kubeconfig = Kubeconfig::read_from(api.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

const TIMING: ElectionConfig = ElectionConfig {
    lease_duration: Duration::from_secs(4),
    renew_deadline: Duration::from_secs(3),
    retry_period: Duration::from_millis(500),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_elect_one_leader_and_a_killed_leader_is_replaced_in_time() {
    let client = client("relays-election").await;
    let mut cs: Vec<Candidate> = (0..3)
        .map(|i| {
            let shutdown = CancellationToken::new();
            let lock = KubeLease::new(
                client.clone(),
                "relays-election",
                "relay",
                &format!("relay-{i}"),
                TIMING.lease_duration,
            );
            let (elector, task) = Elector::start(Arc::new(lock), TIMING, shutdown.clone());
            Candidate {
                elector,
                task,
                shutdown,
            }
        })
        .collect();
    let (leader, _) = wait_for_one_leader(&cs, Duration::from_secs(10)).await;

    // Several renewals pass with exactly one leader, and the Lease names it.
    let started = Instant::now();
    while started.elapsed() < TIMING.lease_duration * 2 {
        assert_eq!(leaders(&cs), [leader]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), "relays-election");
    let spec = leases.get("relay").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity, Some(format!("relay-{leader}")));
    assert_eq!(spec.lease_transitions, Some(0));

    // Killed: no renewal and no release, as after SIGKILL.
    let killed = cs.remove(leader);
    killed.task.abort();
    let killed_at = Instant::now();
    let (successor, took) = wait_for_one_leader(&cs, Duration::from_secs(20)).await;
    let bound = TIMING.lease_duration + TIMING.renew_deadline;
    println!(
        "Lease hand-over on a real kube-apiserver {}: {took:.2?} (lease {:?}, renew deadline {:?}, bound {bound:?})",
        ephemeral_infra::KUBERNETES_VERSION,
        TIMING.lease_duration,
        TIMING.renew_deadline,
    );
    assert!(took <= bound, "hand-over took {took:?}");
    assert!(
        killed_at.elapsed() >= TIMING.lease_duration - TIMING.retry_period,
        "took over a live lease after {took:?}"
    );
    let spec = leases.get("relay").await.unwrap().spec.unwrap();
    let successor_name = if successor >= leader {
        successor + 1
    } else {
        successor
    };
    assert_eq!(
        spec.holder_identity,
        Some(format!("relay-{successor_name}"))
    );
    assert_eq!(spec.lease_transitions, Some(1));

    for c in cs {
        c.shutdown.cancel();
        c.task.await.unwrap();
    }
    // The leader released the lease on shutdown.
    let spec = leases.get("relay").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity, None);
}

/// A TCP proxy in front of the API server that holds each byte `up` on its
/// way to the server and `down` on its way back, in order: a slow API
/// server, as the field has them.
async fn slow_proxy(up: Duration, down: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    let api = tokio::task::spawn_blocking(api_server).await.unwrap();
    let upstream = api
        .url()
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    /// Copies `from` to `to`, each chunk `delay` after it was read.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let writer = tokio::spawn(async move {
            while let Some((due, bytes)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = to.shutdown().await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
        drop(tx);
        let _ = writer.await;
    }
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::join!(
                    pump(client_read, server_write, up),
                    pump(server_read, client_write, down)
                );
            });
        }
    });
    format!("https://{address}")
}

/// The relays' default timing (the chart's): lease 15 s, renew deadline
/// 10 s, retry every 2 s.
const FIELD_TIMING: ElectionConfig = ElectionConfig {
    lease_duration: Duration::from_secs(15),
    renew_deadline: Duration::from_secs(10),
    retry_period: Duration::from_secs(2),
};

/// Three relays behind a slow API server: after the first election, one
/// leader at every sample for 45 s. Returns the leader timeline.
async fn one_leader_behind(namespace: &str, up: Duration, down: Duration) -> String {
    let mut config = {
        client(namespace).await;
        let api = tokio::task::spawn_blocking(api_server).await.unwrap();
        let kubeconfig = Kubeconfig::read_from(api.kubeconfig()).unwrap();
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap()
    };
    config.cluster_url = slow_proxy(up, down).await.parse().unwrap();
    config.read_timeout = Some(Duration::from_secs(30));
    let slow = kube::Client::try_from(config).unwrap();
    let cs: Vec<Candidate> = (0..3)
        .map(|i| {
            let shutdown = CancellationToken::new();
            let lock = KubeLease::new(
                slow.clone(),
                namespace,
                "relay",
                &format!("relay-{i}"),
                FIELD_TIMING.lease_duration,
            );
            let (elector, task) = Elector::start(Arc::new(lock), FIELD_TIMING, shutdown.clone());
            Candidate {
                elector,
                task,
                shutdown,
            }
        })
        .collect();
    let (first, took) = wait_for_one_leader(&cs, Duration::from_secs(40)).await;
    let mut timeline = format!("{up:?} up, {down:?} down: relay-{first} leads after {took:.1?}");
    let started = Instant::now();
    let mut current = vec![first];
    while started.elapsed() < Duration::from_secs(45) {
        let now = leaders(&cs);
        if now != current {
            timeline += &format!("; at {:.1?}: {now:?}", started.elapsed());
            current = now.clone();
        }
        assert_eq!(now.len(), 1, "{timeline}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in cs {
        c.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), c.task).await;
    }
    timeline
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_leads_throughout_behind_a_slow_api_server() {
    let (each_way, slow_answers) = tokio::join!(
        one_leader_behind(
            "relays-slow-each-way",
            Duration::from_millis(600),
            Duration::from_millis(600)
        ),
        one_leader_behind(
            "relays-slow-answers",
            Duration::ZERO,
            Duration::from_millis(2500)
        ),
    );
    println!("leader timeline: {each_way}");
    println!("leader timeline: {slow_answers}");
}

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

//! The `kube` lease backend against a scripted API server
//! (`testkit::kube_api`), which fails on any call it did not expect, on a
//! call that does not come, and on calls left over.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use testkit::kube_api::{self, reply, status, ApiServer};
use tokio_util::sync::CancellationToken;
use worker::{ElectionConfig, Elector, KubeLease, Leader, LeaseLock};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/relays/leases/relay";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/relays/leases";
const ME: &str = "relay-0";

fn lease_lock(duration: Duration) -> (KubeLease, ApiServer) {
    let (client, api) = kube_api::client("relays");
    (KubeLease::new(client, "relays", "relay", ME, duration), api)
}

fn lease(holder: Option<&str>, version: &str, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "relay", "namespace": "relays", "resourceVersion": version},
        "spec": {
            "holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": transitions,
            "acquireTime": "2026-11-21T09:00:00.000000Z", "renewTime": "2026-11-21T10:00:00.000000Z"
        }
    })
}

/// The scripted API server lets an elector create the Lease and lead.
async fn win_election(api: &mut ApiServer, leading: &mut tokio::sync::watch::Receiver<bool>) {
    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::NOT_FOUND, &status(404, "NotFound"));
    let (created, send) = api.expect(Method::POST, LEASES).await;
    reply(send, StatusCode::CREATED, &created);
    leading.wait_for(|l| *l).await.unwrap();
}

#[tokio::test]
async fn creates_the_lease_when_absent() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let attempt = tokio::spawn(async move { (lock.try_acquire_or_renew(false).await, lock) });

    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::NOT_FOUND, &status(404, "NotFound"));
    let (created, send) = api.expect(Method::POST, LEASES).await;
    reply(send, StatusCode::CREATED, &created);
    let (result, lock) = attempt.await.unwrap();

    assert!(result.unwrap());
    assert_eq!(created["metadata"]["name"], "relay");
    assert_eq!(created["spec"]["holderIdentity"], ME);
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);
    drop(lock);
    api.no_more_calls().await;
}

#[tokio::test]
async fn renews_its_own_lease_with_optimistic_concurrency() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let attempt = tokio::spawn(async move { (lock.try_acquire_or_renew(true).await, lock) });

    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(Some(ME), "7", 3));
    let (renewed, send) = api.expect(Method::PUT, LEASE).await;
    reply(send, StatusCode::OK, &renewed);
    let (result, lock) = attempt.await.unwrap();

    assert!(result.unwrap());
    assert_eq!(
        renewed["metadata"]["resourceVersion"], "7",
        "the update is conditional on what was read"
    );
    assert_eq!(renewed["spec"]["holderIdentity"], ME);
    assert_eq!(
        renewed["spec"]["leaseTransitions"], 3,
        "a renewal is not a transition"
    );
    assert_eq!(
        renewed["spec"]["acquireTime"],
        "2026-11-21T09:00:00.000000Z"
    );
    assert_ne!(renewed["spec"]["renewTime"], "2026-11-21T10:00:00.000000Z");
    drop(lock);
    api.no_more_calls().await;
}

#[tokio::test]
async fn backs_off_while_another_holders_lease_is_valid() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let attempt = tokio::spawn(async move { (lock.try_acquire_or_renew(false).await, lock) });

    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(Some("relay-1"), "5", 2));
    let (result, lock) = attempt.await.unwrap();

    assert!(!result.unwrap());
    drop(lock);
    api.no_more_calls().await;
}

/// Another holder's lease counts as expired once its record has not changed
/// for a lease duration by our clock; then we take it, one transition more.
#[tokio::test(start_paused = true)]
async fn takes_over_an_expired_lease_with_one_more_transition() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let lock = Arc::new(lock);
    let l = lock.clone();
    let first = tokio::spawn(async move { l.try_acquire_or_renew(false).await });
    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(Some("relay-1"), "5", 2));
    assert!(!first.await.unwrap().unwrap());

    tokio::time::advance(Duration::from_secs(16)).await;
    let l = lock.clone();
    let second = tokio::spawn(async move { l.try_acquire_or_renew(false).await });
    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(Some("relay-1"), "5", 2));
    let (taken, send) = api.expect(Method::PUT, LEASE).await;
    reply(send, StatusCode::OK, &taken);

    assert!(second.await.unwrap().unwrap());
    assert_eq!(taken["spec"]["holderIdentity"], ME);
    assert_eq!(taken["spec"]["leaseTransitions"], 3);
    assert_eq!(taken["metadata"]["resourceVersion"], "5");
    assert_ne!(taken["spec"]["acquireTime"], "2026-11-21T09:00:00.000000Z");
    drop(lock);
    api.no_more_calls().await;
}

#[tokio::test]
async fn a_conflict_on_a_concurrent_take_over_means_not_leader() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let attempt = tokio::spawn(async move { (lock.try_acquire_or_renew(false).await, lock) });

    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(None, "9", 4));
    let (_, send) = api.expect(Method::PUT, LEASE).await;
    reply(send, StatusCode::CONFLICT, &status(409, "Conflict"));
    let (result, lock) = attempt.await.unwrap();

    assert!(!result.unwrap());
    drop(lock);
    api.no_more_calls().await;
}

/// The leader steps down the moment its renewal deadline passes while the
/// API keeps failing; it does not wait for a request or a watch to notice.
#[tokio::test(start_paused = true)]
async fn steps_down_when_the_api_fails_past_the_renewal_window() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let shutdown = CancellationToken::new();
    let (elector, task) =
        Elector::start(Arc::new(lock), ElectionConfig::default(), shutdown.clone());
    let mut leading = elector.subscribe();

    win_election(&mut api, &mut leading).await;
    let won = tokio::time::Instant::now();

    // From now on the API server answers every call with a 500.
    let failing = tokio::spawn(async move {
        let mut calls = 0;
        while let Some(call) = api.until_gone().await {
            calls += 1;
            call.reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status(500, "InternalError"),
            );
        }
        calls
    });
    leading.wait_for(|l| !*l).await.unwrap();
    let lost_after = won.elapsed();

    assert!(
        lost_after >= Duration::from_secs(10),
        "stepped down after {lost_after:?}"
    );
    assert!(
        lost_after < Duration::from_millis(10_100),
        "stepped down only after {lost_after:?}"
    );
    assert!(elector.healthy());
    shutdown.cancel();
    task.await.unwrap();
    let calls = failing.await.unwrap();
    assert!(calls >= 4, "renewals were attempted: {calls}");
}

#[tokio::test(start_paused = true)]
async fn releases_the_lease_on_shutdown() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let shutdown = CancellationToken::new();
    let (elector, task) =
        Elector::start(Arc::new(lock), ElectionConfig::default(), shutdown.clone());
    let mut leading = elector.subscribe();
    win_election(&mut api, &mut leading).await;

    shutdown.cancel();
    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(Some(ME), "2", 0));
    let (released, send) = api.expect(Method::PUT, LEASE).await;
    reply(send, StatusCode::OK, &released);
    task.await.unwrap();

    assert!(released["spec"]["holderIdentity"].is_null(), "{released}");
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(released["metadata"]["resourceVersion"], "2");
    assert!(!elector.is_leader());
    drop(elector);
    api.no_more_calls().await;
}

/// A lease that still names us while we do not lead (we stepped down, or a
/// write we gave up on committed) is not renewed: it must expire like
/// anyone's, or no other candidate could ever take it.
#[tokio::test(start_paused = true)]
async fn a_lease_naming_us_is_not_renewed_unless_we_lead() {
    let (lock, mut api) = lease_lock(Duration::from_secs(15));
    let lock = Arc::new(lock);
    let l = lock.clone();
    let first = tokio::spawn(async move { l.try_acquire_or_renew(false).await });
    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(Some(ME), "9", 4));
    assert!(!first.await.unwrap().unwrap(), "no PUT: not ours to renew");

    // Unchanged for a lease duration: expired, and then anyone's, ours too.
    tokio::time::advance(Duration::from_secs(16)).await;
    let l = lock.clone();
    let second = tokio::spawn(async move { l.try_acquire_or_renew(false).await });
    let (_, send) = api.expect(Method::GET, LEASE).await;
    reply(send, StatusCode::OK, &lease(Some(ME), "9", 4));
    let (taken, send) = api.expect(Method::PUT, LEASE).await;
    reply(send, StatusCode::OK, &taken);
    assert!(second.await.unwrap().unwrap());
    assert_eq!(taken["spec"]["leaseTransitions"], 5, "a new term");
    drop(lock);
    api.no_more_calls().await;
}

//! The scripted API server (`testkit::kube_api`), the resources it serves
//! and the relay parts the tests steer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay::{Controls, ProtectionConfig, RelayMetrics, SinkGuard};
use serde_json::{json, Value};
use sink::{Failure, FailureKind, Message, Outcome, Sink};
use worker::{BreakerConfig, SystemClock};

pub const NAMESPACE: &str = "relays";
pub const RESOURCES: &str = "/apis/orders-center.io/v1alpha1/namespaces/relays/outboxrelays";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/relays/events";

pub use testkit::kube_api::{reply_events, ApiServer, Call};

pub fn client() -> (kube::Client, ApiServer) {
    testkit::kube_api::client(NAMESPACE)
}

/// An `OutboxRelay` as the API server returns it.
pub fn resource(
    name: &str,
    destination: &str,
    paused: bool,
    generation: i64,
    status: Value,
) -> Value {
    json!({
        "apiVersion": "orders-center.io/v1alpha1", "kind": "OutboxRelay",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                     "generation": generation, "resourceVersion": format!("{generation}"),
                     "creationTimestamp": "2026-12-06T09:00:00Z"},
        "spec": {"destination": destination, "paused": paused},
        "status": status,
    })
}

/// A list answer of the resources.
pub fn list(version: &str, items: &[Value]) -> Value {
    json!({"apiVersion": "orders-center.io/v1alpha1", "kind": "OutboxRelayList",
           "metadata": {"resourceVersion": version}, "items": items})
}

/// A sink that fails while told to, and counts what it delivered.
#[derive(Default)]
pub struct Switch {
    pub failing: AtomicBool,
    pub delivered: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Sink for Switch {
    async fn deliver(&self, message: &Message) -> Outcome {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Failure {
                kind: FailureKind::Transient,
                class: "unavailable",
                counts_against_destination: true,
                retry_after: None,
                detail: "down".into(),
            });
        }
        self.delivered
            .lock()
            .unwrap()
            .push(message.aggregate_id.clone());
        Ok(())
    }
}

impl Switch {
    pub fn count(&self) -> usize {
        self.delivered.lock().unwrap().len()
    }
}

pub fn protection(failure_threshold: u32, cool_down: Duration) -> ProtectionConfig {
    ProtectionConfig {
        max_in_flight: 8,
        rate_per_second: None,
        breaker: BreakerConfig {
            failure_threshold,
            cool_down,
        },
    }
}

/// The guard and controls of `destination`, delivering through `sink`.
pub fn controls(
    destination: &str,
    sink: Arc<Switch>,
    protection: ProtectionConfig,
) -> (Arc<SinkGuard>, Arc<Controls>) {
    let guard = Arc::new(SinkGuard::new(
        sink,
        protection,
        Arc::new(SystemClock),
        RelayMetrics::new().destination(destination),
    ));
    let controls = Controls::new(destination.parse().unwrap(), guard.clone(), 100);
    (guard, Arc::new(controls))
}

/// Log lines of WARN and above, captured while the guard lives (on this
/// thread: a current-thread runtime's tasks included).
pub fn capture_warnings() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let writer = Shared(out.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (out, tracing::subscriber::set_default(subscriber))
}

/// How many captured lines hold `needle`.
pub fn occurrences(captured: &Mutex<Vec<u8>>, needle: &str) -> usize {
    let text = String::from_utf8_lossy(&captured.lock().unwrap()).into_owned();
    text.lines().filter(|l| l.contains(needle)).count()
}

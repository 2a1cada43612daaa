//! A stand-in for 1C that implements its order contract in memory, counts
//! what it receives so tests can prove "exactly once in effect", and injects
//! faults on demand.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use onec::{Applied, ApplyResponse, WireOrder};
use prometheus::{Encoder, IntCounter, IntGauge};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Faults to inject. All zero/false means a healthy 1C.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of deliveries answered with an injected 500, 503 or 429 (0–1).
    pub error_rate: f64,
    /// Share of injected errors raised after the order was applied, as if
    /// the answer was lost: the retry then arrives as a duplicate (0–1).
    pub fail_after_apply: f64,
    /// Added to every answer, in milliseconds.
    pub latency_ms: u64,
    /// Share of deliveries that are additionally slow (0–1).
    pub slow_rate: f64,
    /// Extra delay of a slow delivery, in milliseconds.
    pub slow_ms: u64,
    /// Deliveries of orders whose id starts with this are always slow
    /// (empty: none), to hold chosen orders in doubt.
    pub slow_prefix: String,
    /// Every delivery gets 503, as if 1C were down.
    pub outage: bool,
    /// The body of a 200 trickles out over this many milliseconds.
    pub slow_body_ms: u64,
    /// `Retry-After` seconds on injected 503 and 429 answers.
    pub retry_after_secs: u64,
}

impl Faults {
    fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("error_rate", self.error_rate),
            ("fail_after_apply", self.fail_after_apply),
            ("slow_rate", self.slow_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be between 0 and 1"));
            }
        }
        Ok(())
    }
}

/// Counters of everything the mock saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Valid, authenticated deliveries that reached the version check
    /// (`applied + duplicates + stale`).
    pub received: u64,
    /// Versions stored because they were newer than the one held.
    pub applied: u64,
    /// Deliveries of exactly the version held.
    pub duplicates: u64,
    /// Deliveries of a version older than the one held.
    pub stale: u64,
    /// Deliveries refused with 400.
    pub rejected: u64,
    /// Deliveries refused with 401.
    pub unauthorized: u64,
    /// Errors injected (before or after applying).
    pub injected_errors: u64,
    /// Injected errors raised after applying: their answer was "lost".
    pub responses_lost: u64,
    /// Deliveries refused because of an injected outage.
    pub outage_rejections: u64,
    /// Orders held.
    pub orders: u64,
    /// Deliveries being answered right now.
    pub in_flight: u64,
    /// The most deliveries ever answered at once.
    pub max_in_flight: u64,
}

/// The mock's counters, kept as Prometheus metrics on their own registry.
struct Counters {
    registry: prometheus::Registry,
    received: IntCounter,
    applied: IntCounter,
    duplicates: IntCounter,
    stale: IntCounter,
    rejected: IntCounter,
    unauthorized: IntCounter,
    injected_errors: IntCounter,
    responses_lost: IntCounter,
    outage_rejections: IntCounter,
    in_flight: IntGauge,
    max_in_flight: IntGauge,
    orders: IntGauge,
}

impl Counters {
    fn new() -> Self {
        let registry = prometheus::Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Self {
            received: counter(
                "onec_mock_received_total",
                "Deliveries that reached the version check.",
            ),
            applied: counter(
                "onec_mock_applied_total",
                "Versions stored because they were newer.",
            ),
            duplicates: counter(
                "onec_mock_duplicates_total",
                "Deliveries of the version already held.",
            ),
            stale: counter(
                "onec_mock_stale_total",
                "Deliveries older than the version held.",
            ),
            rejected: counter("onec_mock_rejected_total", "Deliveries refused with 400."),
            unauthorized: counter(
                "onec_mock_unauthorized_total",
                "Deliveries refused with 401.",
            ),
            injected_errors: counter("onec_mock_injected_errors_total", "Errors injected."),
            responses_lost: counter(
                "onec_mock_responses_lost_total",
                "Injected errors raised after applying.",
            ),
            outage_rejections: counter(
                "onec_mock_outage_rejections_total",
                "Deliveries refused by an injected outage.",
            ),
            in_flight: gauge("onec_mock_in_flight", "Deliveries being answered now."),
            max_in_flight: gauge(
                "onec_mock_max_in_flight",
                "The most deliveries ever answered at once.",
            ),
            orders: gauge("onec_mock_orders", "Orders held."),
            registry,
        }
    }

    fn all_counters(&self) -> [&IntCounter; 9] {
        [
            &self.received,
            &self.applied,
            &self.duplicates,
            &self.stale,
            &self.rejected,
            &self.unauthorized,
            &self.injected_errors,
            &self.responses_lost,
            &self.outage_rejections,
        ]
    }
}

fn bump(c: &IntCounter) {
    c.inc();
}

struct Held {
    version: i64,
    /// The body as received, version included; `None` before the first.
    order: Option<WireOrder<serde_json::Value>>,
    /// Trace ids of the deliveries of this order, oldest first (at most 20).
    trace_ids: Vec<String>,
    /// When the held version was applied, for in-process latency benchmarks.
    applied_at: std::time::Instant,
}

const TRACES_KEPT: usize = 20;

/// The mock's configuration.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// Basic-auth user name 1C accepts.
    pub username: String,
    /// Basic-auth password 1C accepts.
    pub password: String,
    /// Faults from the start.
    pub faults: Faults,
}

/// Shared state of the mock; cheap to clone.
#[derive(Clone)]
pub struct MockState {
    inner: Arc<Inner>,
}

struct Inner {
    expected_auth: String,
    orders: Mutex<HashMap<String, Held>>,
    faults: RwLock<Faults>,
    counters: Counters,
}

impl MockState {
    /// A mock holding no orders.
    pub fn new(config: MockConfig) -> Result<Self, String> {
        config.faults.validate()?;
        let token = base64_encode(format!("{}:{}", config.username, config.password).as_bytes());
        Ok(Self {
            inner: Arc::new(Inner {
                expected_auth: format!("Basic {token}"),
                orders: Mutex::default(),
                faults: RwLock::new(config.faults),
                counters: Counters::new(),
            }),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let gauge = |g: &IntGauge| u64::try_from(g.get()).unwrap_or(0);
        Stats {
            received: c.received.get(),
            applied: c.applied.get(),
            duplicates: c.duplicates.get(),
            stale: c.stale.get(),
            rejected: c.rejected.get(),
            unauthorized: c.unauthorized.get(),
            injected_errors: c.injected_errors.get(),
            responses_lost: c.responses_lost.get(),
            outage_rejections: c.outage_rejections.get(),
            orders: self.inner.orders.lock().expect("not poisoned").len() as u64,
            in_flight: gauge(&c.in_flight),
            max_in_flight: gauge(&c.max_in_flight),
        }
    }

    /// The version held for `order` and when it was applied.
    pub fn applied(&self, order: &str) -> Option<(i64, std::time::Instant)> {
        let orders = self.inner.orders.lock().expect("not poisoned");
        orders
            .get(order)
            .filter(|h| h.version > 0)
            .map(|h| (h.version, h.applied_at))
    }

    fn faults(&self) -> Faults {
        self.inner.faults.read().expect("not poisoned").clone()
    }
}

/// Serves a mock on `listener` in the background until `shutdown`
/// completes. Returns its state, for in-process callers, and the server task.
pub fn spawn(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(MockState, tokio::task::JoinHandle<std::io::Result<()>>), String> {
    let state = MockState::new(config)?;
    let limits = http_server::Limits::default();
    let app = http_server::with_limits(router(state.clone()), &limits);
    let server =
        tokio::spawn(async move { http_server::serve(listener, app, &limits, shutdown).await });
    Ok((state, server))
}

/// The mock's routes: the 1C contract, stats and fault administration.
pub fn router(state: MockState) -> Router {
    Router::new()
        .route("/hs/orders/v1/orders/{id}", put(put_order).get(get_order))
        .route(
            "/stats",
            get(|State(s): State<MockState>| async move { Json(s.stats()) }),
        )
        .merge(
            Router::new()
                .route("/admin/orders", get(held_versions))
                .route("/admin/orders/{id}/traces", get(trace_ids))
                .route("/admin/faults", get(get_faults).put(set_faults))
                .route("/admin/reset", post(reset))
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    admin_access,
                )),
        )
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Counts a delivery as in flight for as long as it lives.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn enter(c: &'a Counters) -> Self {
        c.in_flight.inc();
        let now = c.in_flight.get();
        if now > c.max_in_flight.get() {
            c.max_in_flight.set(now);
        }
        Self(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

fn bad_request(c: &Counters, reason: impl Into<String>) -> Response {
    bump(&c.rejected);
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": reason.into()})),
    )
        .into_response()
}

/// Compares without an early exit, so timing does not leak how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &MockState, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| constant_time_eq(v.as_bytes(), state.inner.expected_auth.as_bytes()))
}

/// The admin endpoints read every order and switch faults on: callers from
/// another host need the mock's credentials. Loopback (the same machine, or
/// a port-forward into the pod) is trusted, as for the tour in `dev`.
async fn admin_access(
    State(state): State<MockState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let local = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .is_some_and(|p| p.0.ip().is_loopback());
    if local || authorized(&state, request.headers()) {
        next.run(request).await
    } else {
        bump(&state.inner.counters.unauthorized);
        unauthorized()
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"1C\"")],
        Json(serde_json::json!({"error": "bad credentials"})),
    )
        .into_response()
}

/// An injected error answer: 500, or 503 / 429 with `Retry-After`.
fn injected_error(retry_after_secs: u64) -> Response {
    let pick = rand::rng().random_range(0..3);
    let retry_after = HeaderValue::from(retry_after_secs);
    match pick {
        0 => (StatusCode::INTERNAL_SERVER_ERROR, "injected failure").into_response(),
        1 => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, retry_after)],
            "injected unavailability",
        )
            .into_response(),
        _ => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after)],
            "injected throttling",
        )
            .into_response(),
    }
}

enum Injection {
    None,
    Before,
    After,
}

async fn put_order(
    State(state): State<MockState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Like 1C, the mock finishes a request whose client gave up waiting, so
    // a delivery that timed out can still be applied, late.
    tokio::spawn(apply_order(state, id, headers, body))
        .await
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn apply_order(state: MockState, id: String, headers: HeaderMap, body: Bytes) -> Response {
    let c = &state.inner.counters;
    let _in_flight = InFlight::enter(c);
    let faults = state.faults();
    if faults.outage {
        bump(&c.outage_rejections);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                header::RETRY_AFTER,
                HeaderValue::from(faults.retry_after_secs),
            )],
            "1C is down (injected outage)",
        )
            .into_response();
    }
    if !authorized(&state, &headers) {
        bump(&c.unauthorized);
        return unauthorized();
    }
    let (delay, injection) = {
        let mut rng = rand::rng();
        let slow = rng.random_bool(faults.slow_rate)
            || (!faults.slow_prefix.is_empty() && id.starts_with(&faults.slow_prefix));
        let delay = faults.latency_ms + if slow { faults.slow_ms } else { 0 };
        let injection = if rng.random_bool(faults.error_rate) {
            if rng.random_bool(faults.fail_after_apply) {
                Injection::After
            } else {
                Injection::Before
            }
        } else {
            Injection::None
        };
        (delay, injection)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let wire: WireOrder<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(c, format!("body is not an order version: {e}")),
    };
    let version = wire.version;
    if version < 1 {
        return bad_request(c, "version must be positive");
    }
    if wire.snapshot.pointer("/order/id").and_then(|v| v.as_str()) != Some(id.as_str()) {
        return bad_request(c, "order.id must match the id in the path");
    }
    let expected_key = format!("{id}:{version}");
    match headers.get("idempotency-key").map(|v| v.as_bytes()) {
        Some(k) if k == expected_key.as_bytes() => {}
        _ => return bad_request(c, format!("Idempotency-Key must be {expected_key}")),
    }

    if matches!(injection, Injection::Before) {
        bump(&c.injected_errors);
        return injected_error(faults.retry_after_secs);
    }
    let trace_id = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(telemetry::trace_id)
        .map(str::to_owned);
    let (result, held) = {
        let mut orders = state.inner.orders.lock().expect("not poisoned");
        bump(&c.received);
        let entry = orders.entry(id).or_insert_with(|| Held {
            version: 0,
            order: None,
            trace_ids: Vec::new(),
            applied_at: std::time::Instant::now(),
        });
        if let Some(t) = trace_id {
            if entry.trace_ids.len() == TRACES_KEPT {
                entry.trace_ids.remove(0);
            }
            entry.trace_ids.push(t);
        }
        let outcome = if entry.version == version {
            bump(&c.duplicates);
            Applied::Duplicate
        } else if entry.version > version {
            bump(&c.stale);
            Applied::Stale
        } else {
            bump(&c.applied);
            entry.version = version;
            entry.order = Some(wire);
            entry.applied_at = std::time::Instant::now();
            Applied::Applied
        };
        let held = entry.version;
        c.orders.set(orders.len() as i64);
        (outcome, held)
    };
    if matches!(injection, Injection::After) {
        bump(&c.injected_errors);
        bump(&c.responses_lost);
        return injected_error(faults.retry_after_secs);
    }
    let payload = serde_json::to_string(&ApplyResponse {
        result,
        version: held,
    })
    .expect("an answer serializes");
    if faults.slow_body_ms == 0 {
        return ([(header::CONTENT_TYPE, "application/json")], payload).into_response();
    }
    slow_body(payload, Duration::from_millis(faults.slow_body_ms))
}

/// Sends the body a byte at a time, spread over `over`.
fn slow_body(payload: String, over: Duration) -> Response {
    let bytes = payload.into_bytes();
    let pause = over / bytes.len().max(1) as u32;
    let stream = futures::stream::unfold(0, move |i| {
        let bytes = bytes.clone();
        async move {
            if i >= bytes.len() {
                return None;
            }
            tokio::time::sleep(pause).await;
            Some((
                Ok::<_, Infallible>(Bytes::copy_from_slice(&bytes[i..=i])),
                i + 1,
            ))
        }
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn get_order(
    State(state): State<MockState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        bump(&state.inner.counters.unauthorized);
        return unauthorized();
    }
    let orders = state.inner.orders.lock().expect("not poisoned");
    match orders.get(&id) {
        Some(h) => Json(h.order.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such order"})),
        )
            .into_response(),
    }
}

/// The trace ids the deliveries of one order carried, oldest first.
async fn trace_ids(State(state): State<MockState>, Path(id): Path<String>) -> Response {
    let orders = state.inner.orders.lock().expect("not poisoned");
    match orders.get(&id) {
        Some(h) => {
            Json(serde_json::json!({"order_id": id, "trace_ids": h.trace_ids})).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such order"})),
        )
            .into_response(),
    }
}

async fn held_versions(State(state): State<MockState>) -> Json<HashMap<String, i64>> {
    let orders = state.inner.orders.lock().expect("not poisoned");
    Json(orders.iter().map(|(k, h)| (k.clone(), h.version)).collect())
}

async fn get_faults(State(state): State<MockState>) -> Json<Faults> {
    Json(state.faults())
}

async fn set_faults(State(state): State<MockState>, Json(faults): Json<Faults>) -> Response {
    if let Err(reason) = faults.validate() {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": reason})),
        )
            .into_response();
    }
    *state.inner.faults.write().expect("not poisoned") = faults.clone();
    Json(faults).into_response()
}

async fn reset(State(state): State<MockState>) -> StatusCode {
    state.inner.orders.lock().expect("not poisoned").clear();
    let c = &state.inner.counters;
    for counter in c.all_counters() {
        counter.reset();
    }
    c.max_in_flight.set(c.in_flight.get());
    c.orders.set(0);
    StatusCode::NO_CONTENT
}

async fn metrics(State(state): State<MockState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&state.inner.counters.registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        buf,
    )
}

fn base64_encode(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

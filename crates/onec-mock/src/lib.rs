//! A stand-in for 1C that implements its order contract in memory, counts
//! what it receives so tests can prove "exactly once in effect", and injects
//! faults on demand.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
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

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    stale: AtomicU64,
    rejected: AtomicU64,
    unauthorized: AtomicU64,
    injected_errors: AtomicU64,
    responses_lost: AtomicU64,
    outage_rejections: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Held {
    version: i64,
    order: serde_json::Value,
}

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
                counters: Counters::default(),
            }),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            received: load(&c.received),
            applied: load(&c.applied),
            duplicates: load(&c.duplicates),
            stale: load(&c.stale),
            rejected: load(&c.rejected),
            unauthorized: load(&c.unauthorized),
            injected_errors: load(&c.injected_errors),
            responses_lost: load(&c.responses_lost),
            outage_rejections: load(&c.outage_rejections),
            orders: self.inner.orders.lock().expect("not poisoned").len() as u64,
            in_flight: load(&c.in_flight),
            max_in_flight: load(&c.max_in_flight),
        }
    }

    fn faults(&self) -> Faults {
        self.inner.faults.read().expect("not poisoned").clone()
    }
}

/// The mock's routes: the 1C contract, stats and fault administration.
pub fn router(state: MockState) -> Router {
    Router::new()
        .route("/hs/orders/v1/orders/{id}", put(put_order).get(get_order))
        .route(
            "/stats",
            get(|State(s): State<MockState>| async move { Json(s.stats()) }),
        )
        .route("/admin/orders", get(held_versions))
        .route("/admin/faults", get(get_faults).put(set_faults))
        .route("/admin/reset", post(reset))
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
        let now = c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        c.max_in_flight.fetch_max(now, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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
        let slow = rng.random_bool(faults.slow_rate);
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

    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(c, format!("body is not JSON: {e}")),
    };
    let Some(version) = parsed.get("version").and_then(serde_json::Value::as_i64) else {
        return bad_request(c, "version must be an integer");
    };
    if version < 1 {
        return bad_request(c, "version must be positive");
    }
    if parsed.pointer("/order/id").and_then(|v| v.as_str()) != Some(id.as_str()) {
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
    let (result, held) = {
        let mut orders = state.inner.orders.lock().expect("not poisoned");
        bump(&c.received);
        match orders.get_mut(&id) {
            Some(h) if h.version == version => {
                bump(&c.duplicates);
                ("duplicate", h.version)
            }
            Some(h) if h.version > version => {
                bump(&c.stale);
                ("stale", h.version)
            }
            _ => {
                bump(&c.applied);
                orders.insert(
                    id,
                    Held {
                        version,
                        order: parsed,
                    },
                );
                ("applied", version)
            }
        }
    };
    if matches!(injection, Injection::After) {
        bump(&c.injected_errors);
        bump(&c.responses_lost);
        return injected_error(faults.retry_after_secs);
    }
    let payload = serde_json::json!({"result": result, "version": held}).to_string();
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
    for a in [
        &c.received,
        &c.applied,
        &c.duplicates,
        &c.stale,
        &c.rejected,
        &c.unauthorized,
        &c.injected_errors,
        &c.responses_lost,
        &c.outage_rejections,
        &c.max_in_flight,
    ] {
        a.store(0, Ordering::Relaxed);
    }
    StatusCode::NO_CONTENT
}

async fn metrics(State(state): State<MockState>) -> impl IntoResponse {
    let s = state.stats();
    let mut out = String::new();
    for (name, help, v) in [
        (
            "onec_mock_received_total",
            "Deliveries that reached the version check.",
            s.received,
        ),
        ("onec_mock_applied_total", "Versions stored.", s.applied),
        (
            "onec_mock_duplicates_total",
            "Deliveries of the version held.",
            s.duplicates,
        ),
        (
            "onec_mock_stale_total",
            "Deliveries older than the version held.",
            s.stale,
        ),
        (
            "onec_mock_rejected_total",
            "Deliveries refused with 400.",
            s.rejected,
        ),
        (
            "onec_mock_injected_errors_total",
            "Errors injected.",
            s.injected_errors,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn base64_encode(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

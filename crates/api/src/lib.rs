//! The orders-center HTTP API: the axum router, its handlers, problem+json
//! errors, metrics and the OpenAPI document.

mod error;
mod extract;
mod metrics;
mod openapi;
mod routes;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, Problem, PROBLEM_JSON};
pub use metrics::Metrics;
pub use openapi::ApiDoc;

/// Limits every listener applies.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Longest a request may take before it is answered with 408.
    pub request_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything a handler needs; built once, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The repository.
    pub store: store::Store,
    /// The Prometheus registry and the API's metrics.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub config: ApiConfig,
}

impl AppState {
    /// State over a store with fresh metrics.
    pub fn new(store: store::Store, config: ApiConfig) -> Self {
        Self {
            store,
            metrics: Arc::new(Metrics::new()),
            config,
        }
    }
}

/// The complete router: API, ops endpoints and docs, with every layer.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    routes::router()
        .merge(openapi::docs_router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track_requests,
        ))
        .layer(DefaultBodyLimit::max(config.body_limit))
        // 408 rather than 503: the usual cause is a client that sends its body too slowly.
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::map_response(
            error::problem_for_every_error,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The span of one request, continuing the caller's W3C trace context.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let span = tracing::info_span!("request", method = %req.method(), uri = %req.uri());
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    telemetry::set_parent(&span, traceparent);
    span
}

/// Serves `app` on `listener` until `shutdown` completes, then finishes the
/// requests in flight. The caller owns the signal.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

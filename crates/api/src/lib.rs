//! The orders-center HTTP API: the axum router, its handlers, problem+json
//! errors, metrics and the OpenAPI document.

mod auth;
mod error;
pub mod extract;
mod metrics;
mod openapi;
mod routes;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use auth::AuthConfig;
pub use error::{ApiError, Problem, PROBLEM_JSON};
pub use metrics::Metrics;
pub use openapi::ApiDoc;

/// How the API listens and whom it lets in.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// Body, header and request time limits.
    pub limits: http_server::Limits,
    /// Bearer tokens.
    pub auth: AuthConfig,
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
    /// The read cache of whole orders; `None` reads every order from the
    /// database.
    pub cache: Option<order_cache::OrderCache>,
}

impl AppState {
    /// State over a store with fresh metrics and no cache.
    pub fn new(store: store::Store, config: ApiConfig) -> Self {
        Self {
            store,
            metrics: Arc::new(Metrics::new()),
            config,
            cache: None,
        }
    }

    /// The same state with an order cache of `config`, its series on the
    /// API's registry. It serves nothing until its listener listens
    /// ([`order_cache::listener::run`]).
    pub fn with_cache(mut self, config: order_cache::CacheConfig) -> Self {
        let metrics = order_cache::CacheMetrics::register(self.metrics.registry())
            .expect("the cache's series are registered once per API");
        self.cache = Some(order_cache::OrderCache::new(config, metrics));
        self
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
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track_requests,
        ))
        .layer(DefaultBodyLimit::max(config.limits.body_limit))
        .layer(http_server::request_timeout(&config.limits))
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::map_response(
            error::problem_for_every_error,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// A service's router (inventory, payments, notifier) with the API's error
/// handling: unknown routes and axum's own rejections answer problem+json
/// too, and a panic is a 500, not a dropped connection.
pub fn with_problems(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::map_response(
            error::problem_for_every_error,
        ))
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

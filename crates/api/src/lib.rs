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

pub use auth::{protect, AuthConfig};
pub use error::{ApiError, Problem, PROBLEM_JSON};
pub use metrics::Metrics;
pub use openapi::{ApiDoc, RouterWideAnswers};

/// How the API listens and whom it lets in.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// Body, header and request time limits.
    pub limits: http_server::Limits,
    /// Bearer tokens.
    pub auth: AuthConfig,
}

/// Everything a handler needs: built once, and one reference count to clone.
/// Axum clones the state for every extractor and middleware of a request;
/// cloning each field instead (the pool, the routes, the metrics, the cache,
/// the token list) was a fifth of the API's CPU on cached reads (perf).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares; its fields are read through the state.
#[derive(Clone)]
pub struct Shared {
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

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// State over a store with fresh metrics and no cache.
    pub fn new(store: store::Store, config: ApiConfig) -> Self {
        Self(Arc::new(Shared {
            store,
            metrics: Arc::new(Metrics::new()),
            config,
            cache: None,
        }))
    }

    /// The same state with an order cache of `config`, its series on the
    /// API's registry. It serves nothing until its listener listens
    /// ([`order_cache::listener::run`]).
    pub fn with_cache(self, config: order_cache::CacheConfig) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.0);
        let metrics = order_cache::CacheMetrics::register(shared.metrics.registry())
            .expect("the cache's series are registered once per API");
        shared.cache = Some(order_cache::OrderCache::new(config, metrics));
        Self(Arc::new(shared))
    }
}

/// The complete router: API, ops endpoints and docs, with every layer.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let routes = routes::router()
        .merge(openapi::docs_router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) });
    protect(routes, config.auth.clone())
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

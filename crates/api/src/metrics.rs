//! Prometheus metrics of the API role, on its own registry so tests and
//! several roles in one process never collide.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::AppState;

/// The API's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    /// Orders saved, by `outcome` (`created` or `updated`).
    pub orders_saved: IntCounterVec,
    /// Outbox tasks written by saves, by destination.
    pub tasks_enqueued: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric on a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "orders_center_http_requests_total",
                "HTTP requests answered, by method, route and status.",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "orders_center_http_request_duration_seconds",
                "Time to answer an HTTP request.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["method", "route"],
        )
        .expect("valid metric");
        let orders_saved = IntCounterVec::new(
            Opts::new(
                "orders_center_orders_saved_total",
                "Orders saved, by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let tasks_enqueued = IntCounterVec::new(
            Opts::new(
                "orders_center_outbox_enqueued_total",
                "Delivery tasks written to the outbox by saves, by destination.",
            ),
            &["destination"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(orders_saved.clone()),
            Box::new(tasks_enqueued.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            duration,
            orders_saved,
            tasks_enqueued,
        }
    }

    /// Counts one committed save and the tasks it queued.
    pub fn saved(&self, created: bool, queued: &[domain::Destination]) {
        self.orders_saved
            .with_label_values(&[if created { "created" } else { "updated" }])
            .inc();
        for destination in queued {
            self.tasks_enqueued
                .with_label_values(&[destination.as_str()])
                .inc();
        }
    }

    /// The registry, for the series of what the API owns (its cache).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

/// Records every request by its route template, never by its raw path, so an
/// order id never becomes a label.
pub async fn track_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = http_server::method_label(req.method());
    let start = Instant::now();
    let res = next.run(req).await;
    let m = &state.metrics;
    m.duration
        .with_label_values(&[method, &route])
        .observe(start.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[method, &route, res.status().as_str()])
        .inc();
    res
}

//! Logging and tracing for every role. Logs go to stderr as text or JSON.
//! Spans always carry W3C trace context, so a save's trace id follows its
//! outbox task to the relay and on to 1C; with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! set they are also exported over OTLP/HTTP.

use std::collections::HashMap;
use std::io::IsTerminal;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flushes exported spans when dropped; keep it for the life of `main`.
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber and the W3C propagator for `service`.
pub fn init(service: &'static str, format: LogFormat) -> Guard {
    // Set explicitly: the trace context format is part of the 1C contract.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut builder = SdkTracerProvider::builder();
    let mut export_error = None;
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if exporting {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let provider = builder
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Colour only for a person at a terminal: logs written to files (the
    // fault suite's, a container's) stay plain text to search.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "OTLP exporter not started; spans are not exported");
    }
    Guard(exporting.then_some(provider))
}

/// The W3C `traceparent` of `span`, if it has a valid trace context.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote context in `traceparent`; a missing
/// or malformed value leaves `span` the root of a new trace.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// `traceparent` re-encoded if it is a valid W3C trace context, else `None`.
pub fn normalize(traceparent: &str) -> Option<String> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let propagator = TraceContextPropagator::new();
    let cx = propagator.extract(&carrier);
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = HashMap::new();
    propagator.inject_context(&cx, &mut out);
    out.remove("traceparent")
}

/// The trace id of a `traceparent` value.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|t| t.len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tracing<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn a_span_continues_the_trace_of_the_traceparent_it_is_given() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let outgoing = with_tracing(|| {
            let span = tracing::info_span!("deliver");
            set_parent(&span, Some(incoming));
            traceparent(&span)
        })
        .expect("a traceparent");

        assert_eq!(trace_id(&outgoing), trace_id(incoming));
        assert_ne!(
            outgoing, incoming,
            "the span is a child, with its own span id"
        );
        assert!(
            outgoing.ends_with("-01"),
            "sampled stays sampled: {outgoing}"
        );
    }

    #[test]
    fn without_a_parent_a_span_starts_a_new_trace_and_garbage_is_ignored() {
        let (a, b) = with_tracing(|| {
            let a = tracing::info_span!("a");
            set_parent(&a, Some("not-a-traceparent"));
            let b = tracing::info_span!("b");
            (traceparent(&a).unwrap(), traceparent(&b).unwrap())
        });

        assert_ne!(trace_id(&a), trace_id(&b));
        assert_eq!(trace_id(&a).unwrap().len(), 32);
        assert_eq!(trace_id("00-abc"), None);
        assert_eq!(normalize("garbage"), None);
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(normalize(valid).as_deref(), Some(valid));
        // W3C trace context allows lowercase hex only.
        assert_eq!(normalize(&valid.to_uppercase()), None);
    }
}

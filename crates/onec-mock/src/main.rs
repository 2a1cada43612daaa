//! `onec-mock`: serves the 1C order contract from memory, for development
//! and tests.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use onec_mock::{Faults, MockConfig};

/// An in-memory 1C: stores order versions, counts deliveries, injects faults.
#[derive(Debug, Parser)]
#[command(name = "onec-mock", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
    /// Basic-auth user name to accept.
    #[arg(long, env = "ONEC_USERNAME", default_value = "onec")]
    username: String,
    /// Basic-auth password to accept.
    #[arg(
        long,
        env = "ONEC_PASSWORD",
        default_value = "onec",
        hide_env_values = true
    )]
    password: String,
    /// Share of deliveries answered with an injected 500, 503 or 429 (0-1).
    #[arg(long, env = "ONEC_MOCK_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// Share of injected errors raised after applying the order (0-1).
    #[arg(long, env = "ONEC_MOCK_FAIL_AFTER_APPLY", default_value_t = 0.5)]
    fail_after_apply: f64,
    /// Latency added to every delivery, e.g. `20ms`.
    #[arg(long, env = "ONEC_MOCK_LATENCY", default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Share of deliveries that are additionally slow (0-1).
    #[arg(long, env = "ONEC_MOCK_SLOW_RATE", default_value_t = 0.0)]
    slow_rate: f64,
    /// Extra delay of a slow delivery, e.g. `15s`.
    #[arg(long, env = "ONEC_MOCK_SLOW", default_value = "0ms", value_parser = humantime::parse_duration)]
    slow: Duration,
    /// Start in a full outage: every delivery gets 503.
    #[arg(long, env = "ONEC_MOCK_OUTAGE")]
    outage: bool,
    /// Trickle 200 bodies out over this long, e.g. `2s`.
    #[arg(long, env = "ONEC_MOCK_SLOW_BODY", default_value = "0ms", value_parser = humantime::parse_duration)]
    slow_body: Duration,
    /// Log line format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
    log_format: telemetry::LogFormat,
    /// `Retry-After` seconds on injected 503 and 429 answers.
    #[arg(long, env = "ONEC_MOCK_RETRY_AFTER_SECS", default_value_t = 1)]
    retry_after_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = telemetry::init("onec-mock", args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let config = MockConfig {
        username: args.username,
        password: args.password,
        faults: Faults {
            error_rate: args.error_rate,
            fail_after_apply: args.fail_after_apply,
            latency_ms: ms(args.latency),
            slow_rate: args.slow_rate,
            slow_ms: ms(args.slow),
            outage: args.outage,
            slow_body_ms: ms(args.slow_body),
            retry_after_secs: args.retry_after_secs,
            // Set at run time through PUT /admin/faults.
            slow_prefix: String::new(),
        },
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let url = format!("http://{}", listener.local_addr()?);
    let (_, server) = onec_mock::spawn(listener, config, shutdown_signal())
        .map_err(anyhow::Error::msg)
        .context("invalid fault settings")?;
    tracing::info!(%url, "onec-mock listening");
    server.await?.context("serving")
}

fn parse_log_format(s: &str) -> Result<telemetry::LogFormat, String> {
    match s {
        "text" => Ok(telemetry::LogFormat::Text),
        "json" => Ok(telemetry::LogFormat::Json),
        other => Err(format!("{other:?} is not text or json")),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

//! `bench`: measures how fast the relay drains a backlog, how quickly a saved
//! order reaches 1C, how fast the API saves, whether claim cost stays flat as
//! the table grows, the memory of the api and relay processes, and the
//! relay and inbox consumer over a real Kafka and RabbitMQ, the saga, the
//! API's order cache and ingestion. Prints a
//! table and writes JSON. `--quick` runs every scenario small, asserting
//! correctness (every task done exactly once), not speed.
//!
//! Run from a release build: `cargo build --release --locked --bins &&
//! target/release/bench`. The database is `DATABASE_URL`, or a throwaway
//! cluster (fsync off) when it is unset.

mod brokers;
mod cache;
mod cpu;
mod ingest;
mod log;
mod saga;
mod scenarios;

use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;

/// Benchmarks of orders-center.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Small sizes and short runs, for CI: checks correctness, not speed.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeatable); all when omitted.
    #[arg(long, value_enum)]
    only: Vec<Scenario>,
    /// Orders in the no-op drain's backlog (repeatable: one drain each);
    /// 200,000 by default, 5,000 with `--quick`.
    #[arg(long)]
    backlog: Vec<i64>,
    /// The saga's transports (repeatable); all three when omitted.
    #[arg(long, value_enum)]
    saga_over: Vec<SagaOver>,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench.json")]
    json: PathBuf,
}

/// A transport of the saga bench, for `--saga-over`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SagaOver {
    /// Kafka.
    Kafka,
    /// RabbitMQ.
    Rabbitmq,
    /// The PostgreSQL transport (`orders-center dev`).
    Postgresql,
}

/// A scenario of the issue, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 1: drain into a no-op sink.
    Noop,
    /// 1b: "every message in order" against "latest wins" on bursts.
    InOrder,
    /// 2: drain to the mock over HTTP.
    Http,
    /// 3: commit-to-1C latency under offered load.
    Latency,
    /// 3b: the same with 1,000 orders held in doubt beside the fresh ones.
    Held,
    /// 4: API save throughput against pgbench.
    Api,
    /// 5: claim cost and drain rate as the table grows.
    Flat,
    /// 6 and 7: relay, inbox consumer and latency over a real Kafka.
    Kafka,
    /// 6 and 7: the same over a real RabbitMQ.
    Rabbitmq,
    /// 8: the order saga, every role a process, over Kafka and RabbitMQ.
    Saga,
    /// 9: the API's order cache: reads with and without it, warm-up, and
    /// the change-to-other-replica lag.
    Cache,
    /// 10: `orders-center ingest` over Kafka and RabbitMQ.
    Ingest,
    /// 11: the event log over the PostgreSQL transport: drains at a small
    /// and a large backlog, commit → journal latency, dead tuples, RSS.
    Log,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Scenario.
    pub scenario: String,
    /// What was measured.
    pub metric: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The target, as text, when the issue sets one.
    pub target: Option<String>,
    /// Whether the target is met; `None` without a target.
    pub met: Option<bool>,
}

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Orders pre-filled for the no-op drains, one drain each.
    pub noop_backlogs: Vec<i64>,
    /// The saga's transports.
    pub saga_over: Vec<SagaOver>,
    /// Orders of the in-order against latest-wins drains.
    pub in_order_orders: i64,
    /// Orders of each flat-cost drain.
    pub flat_orders: i64,
    /// Tasks drained to the mock over HTTP.
    pub http_tasks: i64,
    /// Seconds of offered load for the latency runs.
    pub latency_seconds: u64,
    /// Offered loads, saves per second.
    pub rates: [u64; 2],
    /// Seconds of API load.
    pub api_seconds: u64,
    /// Finished rows added for the flat-cost run.
    pub finished_rows: i64,
    /// Events of each broker drain.
    pub broker_events: i64,
    /// The event log's small and large backlogs.
    pub log_backlogs: (i64, i64),
}

fn full() -> Sizes {
    Sizes {
        noop_backlogs: vec![200_000],
        saga_over: vec![SagaOver::Kafka, SagaOver::Rabbitmq, SagaOver::Postgresql],
        in_order_orders: 100_000,
        flat_orders: 50_000,
        http_tasks: 50_000,
        latency_seconds: 30,
        rates: [500, 2000],
        api_seconds: 20,
        finished_rows: 2_000_000,
        broker_events: 100_000,
        log_backlogs: (10_000, 1_000_000),
    }
}

fn quick() -> Sizes {
    Sizes {
        noop_backlogs: vec![5_000],
        saga_over: vec![SagaOver::Kafka, SagaOver::Rabbitmq, SagaOver::Postgresql],
        in_order_orders: 5_000,
        flat_orders: 1_250,
        http_tasks: 1_000,
        latency_seconds: 2,
        rates: [100, 200],
        api_seconds: 2,
        finished_rows: 10_000,
        broker_events: 2_000,
        log_backlogs: (1_000, 20_000),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Quiet unless RUST_LOG asks: the figures go to stdout.
    let _telemetry =
        std::env::var_os("RUST_LOG").map(|_| telemetry::init("bench", telemetry::LogFormat::Text));
    let mut sizes = if args.quick { quick() } else { full() };
    if !args.backlog.is_empty() {
        sizes.noop_backlogs.clone_from(&args.backlog);
    }
    if !args.saga_over.is_empty() {
        sizes.saga_over.clone_from(&args.saga_over);
    }
    let mut figures = Vec::new();
    let only = |s| args.only.is_empty() || args.only.contains(&s);
    if let Err(e) = scenarios::run_all(&sizes, args.quick, only, &mut figures).await {
        // Exit now: dropping broker clients whose broker is gone can block
        // the runtime's shutdown for good.
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }

    println!();
    println!(
        "{:<34} {:<38} {:>14} {:<6} {:<16} MET",
        "SCENARIO", "METRIC", "VALUE", "UNIT", "TARGET"
    );
    for f in &figures {
        println!(
            "{:<34} {:<38} {:>14.2} {:<6} {:<16} {}",
            f.scenario,
            f.metric,
            f.value,
            f.unit,
            f.target.as_deref().unwrap_or(""),
            match f.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        );
    }
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&figures)?)?;
    println!("\nfigures written to {}", args.json.display());
    Ok(())
}

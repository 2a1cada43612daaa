//! `fault-suite`: runs the built `api`, three `relay` processes electing a
//! leader through PostgreSQL, and `onec-mock` on a throwaway PostgreSQL, and
//! breaks things while orders are saved: SIGKILLed relays, a PostgreSQL
//! restart, a 1C outage, a slow 1C, racing conditional saves, and SIGTERM
//! under load, 1,000 orders held in doubt beside fresh ones, and order
//! events over a real Kafka and a real RabbitMQ through relay and consumer
//! SIGKILLs and a frozen broker, the order saga over both brokers, and
//! orders ingested from both through a SIGKILL of the ingest process. After each scenario every order must be in
//! 1C at its latest version, with nothing stale and nothing dead; at the
//! end, no log may hold a secret.
//!
//! Run from a release build: `cargo build --release --locked --bins &&
//! target/release/fault-suite`. Bounded: about six minutes.

mod event_streams;
mod ingest_run;
mod load;
mod log_trail;
mod saga_run;
mod scenarios;
mod system;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::Parser;

use crate::scenarios::Figures;
use crate::system::{System, API_TOKEN, ONEC_PASSWORD};

/// The fault suite.
#[derive(Debug, Parser)]
#[command(name = "fault-suite")]
struct Args {
    /// Orders created in the SIGKILL scenario (updates add a third).
    #[arg(long, default_value_t = 15_000)]
    kill_creates: usize,
    /// How long 1C stays down in the outage scenario.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    outage: Duration,
    /// How long the broker stays frozen in the event-stream scenarios.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    broker_outage: Duration,
    /// Run only these scenarios, by number (repeatable); all when omitted.
    #[arg(long)]
    only: Vec<u8>,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/fault-suite.json")]
    json: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut sys = System::start().await?;
    let mut figures: Vec<Figures> = Vec::new();
    let only = |n: u8| args.only.is_empty() || args.only.contains(&n);
    if only(5) {
        figures.push(scenarios::conflicting_saves(&mut sys).await?);
        report(figures.last());
    }
    if only(1) {
        figures.push(scenarios::relay_kills(&mut sys, args.kill_creates).await?);
        report(figures.last());
    }
    if only(2) {
        figures.push(scenarios::database_restart(&mut sys).await?);
        report(figures.last());
    }
    if only(3) {
        figures.push(scenarios::onec_outage(&mut sys, args.outage).await?);
        report(figures.last());
    }
    if only(4) {
        figures.push(scenarios::slow_onec(&mut sys).await?);
        report(figures.last());
    }
    if only(6) {
        figures.push(scenarios::graceful_stop(&mut sys).await?);
        report(figures.last());
    }
    if only(7) {
        figures.push(scenarios::held_orders(&mut sys).await?);
        report(figures.last());
    }

    if only(8) {
        let kafka = event_streams::Broker::start_kafka().await?;
        figures.push(event_streams::event_stream(&mut sys, kafka, args.broker_outage).await?);
        report(figures.last());
    }
    if only(9) {
        let rabbit = event_streams::Broker::start_rabbitmq().await?;
        figures.push(event_streams::event_stream(&mut sys, rabbit, args.broker_outage).await?);
        report(figures.last());
    }

    if only(10) {
        let kafka = event_streams::Broker::start_kafka().await?;
        figures.push(saga_run::saga_run(&mut sys, kafka, args.broker_outage).await?);
        report(figures.last());
    }
    if only(11) {
        let rabbit = event_streams::Broker::start_rabbitmq().await?;
        figures.push(saga_run::saga_run(&mut sys, rabbit, args.broker_outage).await?);
        report(figures.last());
    }

    if only(12) {
        let kafka = event_streams::Broker::start_kafka().await?;
        figures.push(ingest_run::ingest_run(&mut sys, kafka).await?);
        report(figures.last());
    }
    if only(13) {
        let rabbit = event_streams::Broker::start_rabbitmq().await?;
        figures.push(ingest_run::ingest_run(&mut sys, rabbit).await?);
        report(figures.last());
    }

    let everything = everything_delivered(&sys).await?;
    let logs = sys.logs.clone();
    sys.shut_down().await?;
    let (files, scanned) = no_secret_in_logs(&logs)?;

    println!();
    println!(
        "{:<24} {:>7} {:>10} {:>10} {:>5} {:>4} {:>4} {:>9}",
        "SCENARIO", "SAVES", "DELIVERIES", "DUPLICATES", "STALE", "LOST", "DEAD", "RECOVERY"
    );
    for f in &figures {
        println!(
            "{:<24} {:>7} {:>10} {:>10} {:>5} {:>4} {:>4} {:>8.1}s",
            f.scenario, f.saves, f.deliveries, f.duplicates, f.stale, f.lost, f.dead, f.recovery_s
        );
    }
    println!("\nall {everything} orders are in 1C at their latest version");
    println!(
        "{scanned} debug log lines in {files} files (api, mock, relays) hold neither the 1C \
         password nor the API token"
    );
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&figures)?)?;

    for f in &figures {
        ensure!(
            f.lost == 0 && f.stale == 0 && f.dead == 0,
            "{}: lost {}, stale {}, dead {}",
            f.scenario,
            f.lost,
            f.stale,
            f.dead
        );
    }
    Ok(())
}

fn report(f: Option<&Figures>) {
    if let Some(f) = f {
        println!(
            "{}: {} saves, {} deliveries, {} duplicates absorbed, {} stale, {} lost, {} dead, \
             recovered in {:.1} s; {}",
            f.scenario,
            f.saves,
            f.deliveries,
            f.duplicates,
            f.stale,
            f.lost,
            f.dead,
            f.recovery_s,
            f.notes
        );
    }
}

/// Every order in the database is in 1C at exactly its current version.
async fn everything_delivered(sys: &System) -> Result<usize> {
    let orders: Vec<(String, i64)> = sqlx::query_as("SELECT id, version FROM orders")
        .fetch_all(&sys.pool)
        .await?;
    let held = sys.mock_versions().await?;
    let behind: Vec<_> = orders
        .iter()
        .filter(|(id, v)| held.get(id) != Some(v))
        .take(5)
        .collect();
    ensure!(
        behind.is_empty(),
        "orders not at their latest version in 1C: {behind:?}"
    );
    Ok(orders.len())
}

/// Reads every process log of the run; returns the files and lines scanned.
fn no_secret_in_logs(dir: &std::path::Path) -> Result<(usize, usize)> {
    let (mut files, mut lines) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        files += 1;
        let text = std::fs::read_to_string(&path)?;
        lines += text.lines().count();
        for secret in [ONEC_PASSWORD, API_TOKEN] {
            ensure!(
                !text.contains(secret),
                "{} contains a secret",
                path.display()
            );
        }
    }
    ensure!(lines > 0, "no log lines were captured");
    Ok((files, lines))
}

//! 8 and 9: order events over a real Kafka and a real RabbitMQ. The API
//! and the three relays are restarted with `--broker`, and a `consume
//! journal` process records every order event. Then:
//!
//! - 5,000 orders are saved and 1,000 of them updated (half with a status
//!   change); meanwhile a relay is SIGKILLed, and the consumer is SIGKILLed
//!   right after its first inbox commit, before its ack or offset commit
//!   (the `ORDERS_CENTER_HOLD_AFTER_COMMIT` hook holds it there);
//! - the broker is frozen (SIGSTOP) for the outage while saves go on, then
//!   thawed.
//!
//! Every broker event in the log must then be in the journal exactly
//! once, each order's in the order written; the broker's breaker must have
//! opened during the outage and closed after it; and 1C must still have
//! every order at its latest version.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ephemeral_infra::{Kafka, RabbitMq};
use testkit::process::{spawn, Proc};

use crate::load::{creates_then_updates, saves, Client};
use crate::log_trail;
use crate::scenarios::{settle, Figures};
use crate::system::System;

/// A broker of this scenario.
pub enum Broker {
    Kafka(Kafka),
    RabbitMq(RabbitMq),
}

impl Broker {
    pub async fn start_kafka() -> Result<Self> {
        let k = tokio::task::spawn_blocking(Kafka::start).await??;
        Ok(Self::Kafka(k))
    }

    pub async fn start_rabbitmq() -> Result<Self> {
        let r = tokio::task::spawn_blocking(RabbitMq::start).await??;
        Ok(Self::RabbitMq(r))
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka",
            Self::RabbitMq(_) => "rabbitmq",
        }
    }

    pub(crate) fn url(&self) -> String {
        match self {
            Self::Kafka(k) => format!("kafka://{}", k.bootstrap_servers()),
            Self::RabbitMq(r) => r.url(),
        }
    }

    pub(crate) fn pause(&self) -> Result<()> {
        Ok(match self {
            Self::Kafka(k) => k.pause(),
            Self::RabbitMq(r) => r.pause(),
        }?)
    }

    pub(crate) fn resume(&self) -> Result<()> {
        Ok(match self {
            Self::Kafka(k) => k.resume(),
            Self::RabbitMq(r) => r.resume(),
        }?)
    }

    pub(crate) fn stop(self) {
        match self {
            Self::Kafka(k) => k.stop(),
            Self::RabbitMq(r) => r.stop(),
        }
    }
}

const CREATES: usize = 5000;
const UPDATES: usize = 1000;
/// Saves made while the broker is frozen.
const OUTAGE_SAVES: usize = 1500;

async fn start_consumer(sys: &System, env: &[(&str, &str)], hold: Option<&Path>) -> Result<Proc> {
    let mut env = env.to_vec();
    env.push(("DATABASE_URL", &sys.db_url));
    env.push(("LISTEN_ADDR", "127.0.0.1:0"));
    let marker;
    if let Some(path) = hold {
        marker = path.display().to_string();
        env.push(("ORDERS_CENTER_HOLD_AFTER_COMMIT", &marker));
    }
    spawn(
        "orders-center",
        &["consume", "journal"],
        &env,
        "consumer started",
        &sys.logs.join("consumer.log"),
    )
    .await
}

/// Scrapes one series of a process's /metrics.
pub(crate) async fn metric(sys: &System, url: &str, series: &str) -> Result<f64> {
    let text = sys
        .http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Waits until the journal holds every event the log has for `broker`'s
/// destination; if it never does, says where the missing events got to.
async fn journal_caught_up(
    sys: &System,
    broker: &Broker,
    prefix: &str,
    within: Duration,
) -> Result<i64> {
    let destination = broker.name();
    let deadline = Instant::now() + within;
    loop {
        let (expected, journaled): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM event_log WHERE destination = $1),
                    (SELECT count(DISTINCT event_id) FROM order_journal)",
        )
        .bind(destination)
        .fetch_one(&sys.pool)
        .await?;
        if journaled >= expected {
            return Ok(expected);
        }
        if Instant::now() >= deadline {
            let trail = missing_events(sys, broker, prefix).await?;
            anyhow::bail!(
                "after {within:?}, the journal has {journaled} of the {expected} {destination} \
                 events in the log; missing:\n{trail}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The log events of `broker` whose event is not in the journal, at most
/// ten, each with its partition, whether it was buried, whether the inbox
/// has it, and on Kafka where in the topic it is: a loss on the producer's
/// side or the consumer's.
async fn missing_events(sys: &System, broker: &Broker, prefix: &str) -> Result<String> {
    #[derive(sqlx::FromRow)]
    struct Missing {
        position: i64,
        partition: i16,
        aggregateid: String,
        version: i64,
        buried: Option<String>,
        in_inbox: bool,
        event: String,
    }
    let rows: Vec<Missing> = sqlx::query_as(
        "SELECT e.position, e.partition, e.aggregateid, e.version,
                (SELECT d.class || ': ' || d.reason FROM log_dead d
                 WHERE d.destination = e.destination AND d.position = e.position) AS buried,
                EXISTS (SELECT 1 FROM inbox i WHERE i.message_id = e.event_id::text) AS in_inbox,
                e.event_id::text AS event
         FROM event_log e WHERE e.destination = $1
           AND NOT EXISTS (SELECT 1 FROM order_journal j WHERE j.event_id = e.event_id)
         ORDER BY e.position LIMIT 10",
    )
    .bind(broker.name())
    .fetch_all(&sys.pool)
    .await?;
    let ids: Vec<&str> = rows.iter().map(|r| r.event.as_str()).collect();
    let found = match broker {
        Broker::Kafka(k) => kafka_positions(k, &format!("{prefix}order"), &ids).await?,
        Broker::RabbitMq(_) => Default::default(),
    };
    Ok(rows
        .iter()
        .map(|r| {
            let kafka = found.get(&r.event).map_or("not found", String::as_str);
            let logged = log_trail::lines(&sys.logs, 6, |l| l.contains(&r.event));
            format!(
                "  position {} (partition {}) {} v{}, buried: {:?}, event {}, \
                 in the inbox: {}, in Kafka: {kafka}\n{}",
                r.position,
                r.partition,
                r.aggregateid,
                r.version,
                r.buried,
                r.event,
                r.in_inbox,
                logged.join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Where in `topic` the messages of `event_ids` are: every partition read
/// from its start to its end as of now.
async fn kafka_positions(
    k: &Kafka,
    topic: &str,
    event_ids: &[&str],
) -> Result<std::collections::HashMap<String, String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message as _;
    use rdkafka::{Offset, TopicPartitionList};
    let (bootstrap, topic) = (k.bootstrap_servers(), topic.to_owned());
    let ids: Vec<String> = event_ids.iter().map(|s| (*s).to_owned()).collect();
    // librdkafka's calls block: off the runtime.
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("{topic}-diagnosis"))
            .set("enable.auto.commit", "false")
            .create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut ends = std::collections::HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
            if high > 0 {
                ends.insert(p.id(), high);
                assignment.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let mut found = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() && Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m?;
            if ends
                .get(&m.partition())
                .is_some_and(|end| m.offset() + 1 >= *end)
            {
                ends.remove(&m.partition());
            }
            if let Some(id) = brokers::kafka::event_id(&m).filter(|id| ids.contains(id)) {
                found
                    .entry(id)
                    .or_insert_with(String::new)
                    .push_str(&format!("{}/{}@{} ", m.topic(), m.partition(), m.offset()));
            }
        }
        Ok(found)
    })
    .await?
}

pub async fn event_stream(sys: &mut System, broker: Broker, outage: Duration) -> Result<Figures> {
    let name = broker.name();
    let scenario = match broker {
        Broker::Kafka(_) => "8 Kafka event stream",
        Broker::RabbitMq(_) => "9 RabbitMQ event stream",
    };
    let url = broker.url();
    let prefix = format!("fs-{name}-");
    // Publishes fail within 3 s of the freeze, well inside the 5 s claim
    // lease of this suite.
    let env = [
        ("BROKER", url.as_str()),
        ("BROKER_PREFIX", prefix.as_str()),
        ("BROKER_TIMEOUT", "3s"),
    ];
    // The consumer first: on RabbitMQ it declares the queue that the
    // relays' publishes are routed to.
    let marker = sys.logs.join(format!("{name}-held-after-commit"));
    let mut consumer = start_consumer(sys, &env, Some(&marker)).await?;
    sys.restart_api_with(&env).await?;
    sys.restart_relays_with(&env).await?;
    let before = sys.mock_stats().await?;

    let c = Client::new(sys.http.clone(), &sys.api.url);
    let ids = format!("EV{}", name.to_uppercase());
    let load = tokio::spawn({
        let (c, ids) = (c.clone(), ids.clone());
        async move { creates_then_updates(&c, &ids, CREATES, UPDATES, 32).await }
    });
    let started = Instant::now();
    let (mut consumer_killed, mut relay_killed) = (false, false);
    while !(consumer_killed && relay_killed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !consumer_killed && marker.exists() {
            consumer.kill().await?;
            consumer = start_consumer(sys, &env, None).await?;
            consumer_killed = true;
        }
        if !relay_killed && started.elapsed() > Duration::from_secs(3) {
            sys.kill_relay(1).await?;
            tokio::time::sleep(Duration::from_millis(700)).await;
            sys.start_relay(1).await?;
            relay_killed = true;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the consumer never reached its first commit"
        );
    }
    let mut saved = load.await??;
    // One fault at a time: the restarted consumer catches up before the
    // broker freezes.
    journal_caught_up(sys, &broker, &prefix, Duration::from_secs(120)).await?;

    // The outage: saves go on while the broker is frozen.
    let destination = format!("destination=\"{name}\"");
    let breaker = ["orders_center_sink_breaker_state", destination.as_str()];
    let outage_load = tokio::spawn({
        let (c, ids) = (c.clone(), format!("{ids}OUT"));
        async move {
            let mut all = crate::load::Saved::default();
            // Spread over the outage, a batch a second.
            for round in 0..20 {
                let s = saves(&c, &format!("{ids}{round}"), OUTAGE_SAVES / 20, 4).await?;
                all.saves += s.saves;
                all.versions.extend(s.versions);
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
            anyhow::Ok(all)
        }
    });
    broker.pause()?;
    let frozen = Instant::now();
    let mut opened = 0f64;
    while frozen.elapsed() < outage {
        opened = opened.max(sys.relay_metric_max(breaker[0], &breaker[1..]).await?);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    broker.resume()?;
    let thawed = Instant::now();
    let out = outage_load.await??;
    saved.saves += out.saves;
    saved.versions.extend(out.versions);
    sys.drained(Duration::from_secs(180)).await?;

    // Every broker event, in the journal once and in order.
    let expected = journal_caught_up(sys, &broker, &prefix, Duration::from_secs(120)).await?;
    let recovery = thawed.elapsed();
    let (lost, twice, misordered): (i64, i64, i64) = sqlx::query_as(
        // What was sent, in write order: the log's events by position.
        "WITH sent AS (SELECT event_id, position AS seq FROM event_log WHERE destination = $1)
         SELECT
           (SELECT count(*) FROM sent s
              WHERE NOT EXISTS (SELECT 1 FROM order_journal j WHERE j.event_id = s.event_id)),
           (SELECT count(*) - count(DISTINCT event_id) FROM order_journal),
           (SELECT count(*) FROM (
              SELECT s.seq, lag(s.seq) OVER (PARTITION BY j.order_id ORDER BY j.seq) AS prev
              FROM order_journal j JOIN sent s ON s.event_id = j.event_id
            ) x WHERE prev > seq)",
    )
    .bind(name)
    .fetch_one(&sys.pool)
    .await?;
    let duplicates = metric(
        sys,
        &consumer.url,
        "orders_center_consumer_messages_total{consumer=\"journal\",outcome=\"duplicate\"}",
    )
    .await?;
    // A relay that sat out the recovery closes its breaker at its next
    // poll (5 s here) once it finds nothing left to deliver.
    let mut closed = sys.relay_metric_max(breaker[0], &breaker[1..]).await?;
    let drained_at = Instant::now();
    while closed != 0.0 && drained_at.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        closed = sys.relay_metric_max(breaker[0], &breaker[1..]).await?;
    }
    ensure!(lost == 0, "{lost} {name} events never reached the journal");
    ensure!(twice == 0, "{twice} events applied twice");
    ensure!(
        misordered == 0,
        "{misordered} events applied before an older one of their order"
    );
    ensure!(
        opened >= 1.0,
        "the {name} breaker never opened during the outage"
    );
    ensure!(
        closed == 0.0,
        "the {name} breaker is still open after the drain"
    );
    ensure!(
        duplicates >= 1.0,
        "the batch committed before the kill was not redelivered and recognised"
    );
    let notes = format!(
        "{expected} events once each, in order; consumer SIGKILLed after commit, \
         {duplicates:.0} redelivered and skipped; relay SIGKILLed; {} s frozen, \
         breaker opened and closed, journal complete {:.1} s after the thaw",
        outage.as_secs(),
        recovery.as_secs_f64()
    );
    let mut figures = settle(sys, scenario, &before, &saved, thawed, notes).await?;
    figures.recovery_s = recovery.as_secs_f64();

    // Back to the 1C-only system for whatever runs next.
    consumer.stop().await.context("stopping the consumer")?;
    sys.clear_relay_env(&["BROKER", "BROKER_PREFIX", "BROKER_TIMEOUT"]);
    sys.restart_relays_with(&[]).await?;
    sys.restart_api_with(&[]).await?;
    tokio::task::spawn_blocking(move || broker.stop()).await?;
    Ok(figures)
}

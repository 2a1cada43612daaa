//! 12 and 13: orders ingested from a real Kafka and a real RabbitMQ. An
//! `orders-center ingest` process reads `orders.in` while a plain client of
//! the broker publishes 10,000 order messages: 5,000 orders at version 1,
//! 3,500 of them again at version 2, 1,000 redeliveries of messages already
//! sent, and 500 messages the API would refuse (bad JSON, no version, a
//! negative price, a price that is not a number). The ingest process is
//! SIGKILLed once a third of the orders are in, and started again.
//!
//! Then every valid order must be saved once per version (its version in
//! orders-center is the count of versions sent, so a version applied twice
//! would show), at its latest content, and in 1C; and every refused message
//! must be in the dead-letter destination with the problem+json reason.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use brokers::kafka::KafkaConfig;
use brokers::rabbitmq::RabbitConfig;
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use testkit::process::{spawn, Proc};

use crate::event_streams::Broker;
use crate::load::Saved;
use crate::scenarios::{settle, Figures};
use crate::system::System;

const ORDERS: usize = 5_000;
const SECOND_VERSIONS: usize = 3_500;
const REDELIVERIES: usize = 1_000;
const REFUSED: usize = 500;

/// One message as published: the order id (the Kafka key) and the body.
struct Message {
    key: String,
    body: Vec<u8>,
}

fn order(id: &str, version: i64) -> Vec<u8> {
    let mut body = testkit::sample_order_with(id, "new", 100.0 + version as f64);
    body["order"]["executor"] = format!("v{version}").into();
    body["version"] = version.into();
    serde_json::to_vec(&body).expect("json")
}

/// The refused kinds, in turn: not JSON, no version, a rule broken, a
/// field of the wrong type.
fn refused(n: usize) -> Message {
    let id = format!("INBAD-{n}");
    let mut body = testkit::sample_order(&id);
    body["version"] = 1.into();
    let body = match n % 4 {
        0 => b"{\"order\": ".to_vec(),
        1 => {
            body.as_object_mut().unwrap().remove("version");
            serde_json::to_vec(&body).unwrap()
        }
        2 => {
            body["items"][0]["price"] = (-5).into();
            serde_json::to_vec(&body).unwrap()
        }
        _ => {
            body["order"]["price"] = "ten".into();
            serde_json::to_vec(&body).unwrap()
        }
    };
    Message { key: id, body }
}

/// The 10,000 messages in publishing order, and each valid order's last
/// version.
fn plan(prefix: &str) -> (Vec<Message>, HashMap<String, i64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut valid: Vec<(String, i64)> = (0..ORDERS).map(|n| (format!("{prefix}-{n}"), 1)).collect();
    let mut twice: Vec<usize> = (0..ORDERS).collect();
    twice.shuffle(&mut rng);
    valid.extend(
        twice[..SECOND_VERSIONS]
            .iter()
            .map(|&n| (format!("{prefix}-{n}"), 2)),
    );
    let last: HashMap<String, i64> = valid.iter().cloned().collect();
    // Sort keys: a valid message's own position; a redelivery somewhere
    // after its original; a refused one anywhere.
    let mut keyed: Vec<(f64, Message)> = valid
        .iter()
        .enumerate()
        .map(|(i, (id, v))| {
            (
                i as f64,
                Message {
                    key: id.clone(),
                    body: order(id, *v),
                },
            )
        })
        .collect();
    let n = valid.len();
    for _ in 0..REDELIVERIES {
        let j = rng.random_range(0..n);
        let (id, v) = &valid[j];
        let at = j as f64 + rng.random_range(0.1..(n - j) as f64);
        keyed.push((
            at,
            Message {
                key: id.clone(),
                body: order(id, *v),
            },
        ));
    }
    for k in 0..REFUSED {
        keyed.push((rng.random_range(0.0..n as f64), refused(k)));
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    (keyed.into_iter().map(|(_, m)| m).collect(), last)
}

async fn publish(broker: &Broker, prefix: &str, messages: Vec<Message>) -> Result<()> {
    match broker {
        Broker::Kafka(k) => {
            let mut kafka = KafkaConfig::new(&k.bootstrap_servers());
            kafka.topic_prefix = prefix.to_owned();
            let producer = kafka.producer()?;
            let topic = kafka.topic(ingest::DEFAULT_SOURCE);
            let sends = messages.iter().map(|m| {
                let record = rdkafka::producer::FutureRecord::to(&topic)
                    .key(&m.key)
                    .payload(&m.body);
                producer.send(record, Duration::from_secs(30))
            });
            // In order per key: the idempotent producer keeps each
            // partition's order, and every send is queued before any is awaited.
            let results = futures::future::join_all(sends).await;
            for r in results {
                r.map_err(|(e, _)| e)
                    .context("producing an order message")?;
            }
        }
        Broker::RabbitMq(r) => {
            let mut rabbit = RabbitConfig::new(&r.url());
            rabbit.prefix = prefix.to_owned();
            let (_connection, channel) = rabbit.confirmed_channel().await?;
            let exchange = rabbit.exchange(ingest::DEFAULT_SOURCE);
            let mut confirms = Vec::with_capacity(messages.len());
            for m in &messages {
                let properties = lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(m.key.as_str().into());
                confirms.push(
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "order".into(),
                            lapin::options::BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            &m.body,
                            properties,
                        )
                        .await?,
                );
            }
            for c in confirms {
                ensure!(c.await?.is_ack(), "RabbitMQ refused an order message");
            }
        }
    }
    Ok(())
}

/// The dead letters of the ingest consumer by key (the Kafka key, the AMQP
/// message id): each one's class and reason, and how many letters there
/// were. A consumer killed after burying a batch's poison but before its
/// acknowledgement buries them again when the batch comes back: dead
/// letters are at least once.
async fn dead_letters(
    broker: &Broker,
    prefix: &str,
) -> Result<(HashMap<String, (String, Value)>, usize)> {
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let mut found = HashMap::new();
    let mut letters = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    match broker {
        Broker::Kafka(k) => {
            use rdkafka::consumer::{Consumer, StreamConsumer};
            use rdkafka::message::{Headers, Message as _};
            let topic = brokers::kafka::dead_topic(&format!("{prefix}{}", ingest::DEFAULT_SOURCE));
            let consumer: StreamConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", k.bootstrap_servers())
                .set("group.id", format!("{prefix}dead-reader"))
                .set("auto.offset.reset", "earliest")
                .create()?;
            consumer.subscribe(&[&topic])?;
            let mut stream = consumer.stream();
            while found.len() < REFUSED && Instant::now() < deadline {
                let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await
                else {
                    continue;
                };
                let m = m?;
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                        .map(text)
                        .unwrap_or_default()
                };
                let reason = header(brokers::headers::DEAD_REASON);
                letters += 1;
                found.insert(
                    m.key().map(text).unwrap_or_default(),
                    (
                        header(brokers::headers::DEAD_CLASS),
                        serde_json::from_str(&reason).unwrap_or(Value::String(reason)),
                    ),
                );
            }
        }
        Broker::RabbitMq(r) => {
            let mut rabbit = RabbitConfig::new(&r.url());
            rabbit.prefix = prefix.to_owned();
            let (_connection, channel) = rabbit.confirmed_channel().await?;
            let queue = brokers::rabbitmq::dead_queue(
                &rabbit.queue(ingest::CONSUMER, ingest::DEFAULT_SOURCE),
            );
            while found.len() < REFUSED && Instant::now() < deadline {
                let Some(m) = channel
                    .basic_get(
                        queue.as_str().into(),
                        lapin::options::BasicGetOptions { no_ack: true },
                    )
                    .await?
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let header = |name: &str| match m
                    .delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(name).cloned())
                {
                    Some(lapin::types::AMQPValue::LongString(s)) => text(s.as_bytes()),
                    _ => String::new(),
                };
                let reason = header(brokers::headers::DEAD_REASON);
                letters += 1;
                found.insert(
                    m.delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                    (
                        header(brokers::headers::DEAD_CLASS),
                        serde_json::from_str(&reason).unwrap_or(Value::String(reason)),
                    ),
                );
            }
        }
    }
    Ok((found, letters))
}

async fn start_ingest(sys: &System, env: &[(&str, &str)]) -> Result<Proc> {
    let mut env = env.to_vec();
    env.push(("DATABASE_URL", &sys.db_url));
    env.push(("LISTEN_ADDR", "127.0.0.1:0"));
    spawn(
        "orders-center",
        &["ingest"],
        &env,
        "consumer started",
        &sys.logs.join("ingest.log"),
    )
    .await
}

/// Versions of this run's orders (`<ids>-N`) in the ingest inbox.
async fn ingested(sys: &System, ids: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM inbox WHERE consumer = $1 AND message_id LIKE $2 || '-%'",
    )
    .bind(ingest::CONSUMER)
    .bind(ids)
    .fetch_one(&sys.pool)
    .await?)
}

pub async fn ingest_run(sys: &mut System, broker: Broker) -> Result<Figures> {
    let name = broker.name();
    let scenario = match broker {
        Broker::Kafka(_) => "12 Kafka ingestion",
        Broker::RabbitMq(_) => "13 RabbitMQ ingestion",
    };
    let url = broker.url();
    let prefix = format!("fs-in-{name}-");
    let env = [("BROKER", url.as_str()), ("BROKER_PREFIX", prefix.as_str())];
    // The order events of the ingested saves need a queue to be routed to
    // on RabbitMQ: the journal's, read by nobody here.
    if let Broker::RabbitMq(r) = &broker {
        let mut rabbit = RabbitConfig::new(&r.url());
        rabbit.prefix = prefix.clone();
        let journal = brokers::rabbitmq::RabbitSubscription {
            aggregate_type: "order".into(),
            events: ["order.created", "order.updated", "order.status_changed"]
                .map(str::to_owned)
                .to_vec(),
            prefetch: 0,
        };
        brokers::rabbitmq::declare(&rabbit, "journal", &journal).await?;
    }
    // Ingestion declares its topic or queue before it says it started. Its
    // saves route order events to the broker too, so the relays get it.
    let mut consumer = start_ingest(sys, &env).await?;
    sys.restart_relays_with(&env).await?;
    let before = sys.mock_stats().await?;
    let ids = format!("IN{}", name.to_uppercase());
    let (messages, last) = plan(&ids);
    let valid_versions = (ORDERS + SECOND_VERSIONS) as i64;
    let started = Instant::now();
    publish(&broker, &prefix, messages).await?;
    let published = started.elapsed();

    // SIGKILL once a third of the versions are in, then start again.
    while ingested(sys, &ids).await? < valid_versions / 3 {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "ingestion never reached a third"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.kill().await?;
    let killed_at = ingested(sys, &ids).await?;
    consumer = start_ingest(sys, &env).await?;
    let restarted = Instant::now();
    loop {
        let done = ingested(sys, &ids).await?;
        if done >= valid_versions {
            break;
        }
        ensure!(
            restarted.elapsed() < Duration::from_secs(180),
            "after the restart only {done} of {valid_versions} versions are ingested"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();

    // Once per version, at the latest content, and nothing refused saved.
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT id, version, executor FROM orders WHERE id LIKE $1 || '-%'")
            .bind(&ids)
            .fetch_all(&sys.pool)
            .await?;
    ensure!(
        rows.len() == ORDERS,
        "{} of {ORDERS} orders saved",
        rows.len()
    );
    for (id, version, executor) in &rows {
        let sent = last[id];
        ensure!(
            *version == sent,
            "{id}: {sent} versions sent, orders-center is at version {version}"
        );
        ensure!(
            executor == &format!("v{sent}"),
            "{id} holds {executor}, not v{sent}"
        );
    }
    let refused_saved: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE id LIKE 'INBAD-%'")
            .fetch_one(&sys.pool)
            .await?;
    ensure!(
        refused_saved == 0,
        "{refused_saved} refused orders were saved"
    );
    let inbox = ingested(sys, &ids).await?;
    ensure!(
        inbox == valid_versions,
        "{inbox} inbox rows for {valid_versions} versions"
    );

    // Every refused message is dead, with the problem the API would answer.
    let (dead, letters) = dead_letters(&broker, &prefix).await?;
    ensure!(
        dead.len() == REFUSED,
        "{} of {REFUSED} refused messages dead",
        dead.len()
    );
    ensure!(
        dead.keys().all(|k| k.starts_with("INBAD-")),
        "a valid order was dead-lettered"
    );
    let mut classes: HashMap<&str, usize> = HashMap::new();
    for (class, problem) in dead.values() {
        let status = problem["status"].as_u64().unwrap_or_default();
        ensure!(
            matches!(status, 400 | 422)
                && problem["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("urn:orders-center:problem:")),
            "a dead letter without a problem document: {class} {problem}"
        );
        *classes.entry(class.as_str()).or_default() += 1;
    }
    ensure!(
        classes.get("bad_json") == Some(&(REFUSED / 4))
            && classes.get("invalid") == Some(&(REFUSED * 3 / 4)),
        "dead letters by class: {classes:?}"
    );

    // And 1C holds every ingested order at its latest version.
    let saved = Saved {
        versions: last.clone(),
        saves: valid_versions as u64,
    };
    let notes = format!(
        "10,000 messages published in {:.1} s; {valid_versions} versions ingested once each \
         in {:.1} s ({:.0}/s), SIGKILLed at {killed_at}; {REFUSED} dead with problem+json \
         ({classes:?}, {letters} letters); redeliveries skipped",
        published.as_secs_f64(),
        took.as_secs_f64(),
        valid_versions as f64 / took.as_secs_f64(),
    );
    let figures = settle(sys, scenario, &before, &saved, restarted, notes).await?;
    ensure!(
        figures.lost == 0,
        "{} ingested orders are not in 1C at their latest version",
        figures.lost
    );
    consumer.stop().await.context("stopping ingestion")?;
    sys.clear_relay_env(&["BROKER", "BROKER_PREFIX"]);
    sys.restart_relays_with(&[]).await?;
    tokio::task::spawn_blocking(move || broker.stop()).await?;
    Ok(figures)
}

//! 10: `orders-center ingest` as a process over a real Kafka and RabbitMQ.
//! A plain client of the broker publishes whole orders (3 items, 2
//! payments: the body of a `PUT` plus its version) to `orders.in`; the
//! ingest process then saves each through the full save path (validation,
//! order row, lines, history, outbox). The rate is taken on the database
//! clock, from the first inbox commit to the last, so the process start and
//! the consumer group's join are not in it. Next to it: the same run's
//! plain publisher, and the API's `PUT` of the same orders is figure 4.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use testkit::process;

use crate::brokers::{plain_publish_to, Broker};
use crate::scenarios::figure;
use crate::Figure;

fn message(i: i64) -> (String, Vec<u8>) {
    let id = format!("IN-{i}");
    let mut body = testkit::sample_order(&id);
    body["version"] = 1.into();
    (id, serde_json::to_vec(&body).expect("json"))
}

pub async fn run(broker: &mut Broker, quick: bool, out: &mut Vec<Figure>) -> Result<()> {
    let n: i64 = if quick { 1_000 } else { 20_000 };
    let name = broker.name();
    let scenario = format!("10 ingest, {name}");
    broker.fresh(&format!("ingest{n}"));
    let source = ingest::DEFAULT_SOURCE;
    // The queue or topic first, so nothing published is unroutable.
    match broker {
        Broker::Kafka(_, c) => c.ensure_topics(&[source]).await?,
        Broker::RabbitMq(_, c) => {
            let subscription = brokers::rabbitmq::RabbitSubscription {
                aggregate_type: source.into(),
                events: vec!["#".into()],
                prefetch: 0,
            };
            brokers::rabbitmq::declare(c, ingest::CONSUMER, &subscription).await?
        }
        Broker::Postgres => anyhow::bail!("ingestion reads a broker"),
    }
    eprintln!("{name}: publishing {n} orders to {source}");
    let published = plain_publish_to(broker, source, "order", n, message).await?;

    let db = testkit::database().await;
    let prefix = match broker {
        Broker::Kafka(_, c) => c.topic_prefix.clone(),
        Broker::RabbitMq(_, c) => c.prefix.clone(),
        Broker::Postgres => anyhow::bail!("ingestion reads a broker"),
    };
    let url = broker.url();
    let proc = process::spawn(
        "orders-center",
        &["ingest", "--listen", "127.0.0.1:0"],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("BROKER", url.as_str()),
            ("BROKER_PREFIX", prefix.as_str()),
            (
                "CONSUMER_MEMBERS",
                &std::env::var("BENCH_INGEST_MEMBERS").unwrap_or("1".into()),
            ),
        ],
        "consumer started",
        &testkit::target_tmp().join("bench").join("ingest.log"),
    )
    .await?;
    let started = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&db.pool)
            .await?;
        if done >= n {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "ingested {done} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proc.stop().await?;
    // Batches commit with one timestamp each: the first batch starts the
    // clock and is not counted.
    let (first, span, orders, tasks): (i64, f64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM inbox WHERE received_at = (SELECT min(received_at) FROM inbox)),
                extract(epoch FROM max(received_at) - min(received_at))::float8,
                (SELECT count(*) FROM orders), (SELECT count(*) FROM outbox)
         FROM inbox",
    )
    .fetch_one(&db.pool)
    .await?;
    ensure!(orders == n, "{orders} of {n} orders saved");
    ensure!(tasks >= n, "{tasks} outbox rows for {n} saves");
    let rate = (n - first) as f64 / span.max(1e-3);
    out.push(figure(
        &scenario,
        &format!("{n} orders ingested through the save path"),
        rate,
        "order/s",
        (!quick).then_some(("≥ 5000", rate >= 5_000.0)),
    ));
    out.push(figure(
        &scenario,
        "plain publisher, same orders",
        published,
        "msg/s",
        None,
    ));
    Ok(())
}

//! Ingestion over both brokers: whole orders in, each version saved once
//! through the save path, redeliveries and older versions skipped, refused
//! messages dead with the problem+json the API would answer.

use std::time::Duration;

use brokers::kafka::{dead_topic, KafkaConfig, KafkaSubscription};
use brokers::rabbitmq::{dead_queue, RabbitConfig, RabbitSubscription};
use futures::StreamExt;
use inbox::{ConsumerMetrics, Inbox};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use tokio_util::sync::CancellationToken;

const SOURCE: &str = ingest::DEFAULT_SOURCE;

fn order(id: &str, version: i64, executor: &str) -> Vec<u8> {
    let mut body = testkit::sample_order(id);
    body["order"]["executor"] = executor.into();
    body["version"] = version.into();
    serde_json::to_vec(&body).unwrap()
}

/// 40 orders at v1, 20 of them at v2, a redelivery of 10 v1s after their
/// v2, order 30's v3 and then its v2 (late: never applied), and 4 refused
/// messages. Each order's messages keep their order.
fn messages() -> (Vec<(String, Vec<u8>)>, usize) {
    let mut all = Vec::new();
    for o in 0..40 {
        let id = format!("ING-{o}");
        all.push((id.clone(), order(&id, 1, "v1")));
    }
    for o in 0..20 {
        let id = format!("ING-{o}");
        all.push((id.clone(), order(&id, 2, "v2")));
    }
    for o in 0..10 {
        let id = format!("ING-{o}");
        all.push((id.clone(), order(&id, 1, "v1")));
    }
    all.push(("ING-30".into(), order("ING-30", 3, "v3")));
    all.push(("ING-30".into(), order("ING-30", 2, "late")));
    let mut negative = testkit::sample_order("BAD-2");
    negative["version"] = 1.into();
    negative["items"][0]["price"] = (-1).into();
    let mut unversioned = testkit::sample_order("BAD-3");
    unversioned["order"]["id"] = "BAD-3".into();
    let refused = [
        ("BAD-1".to_owned(), b"{\"order\":".to_vec()),
        ("BAD-2".to_owned(), serde_json::to_vec(&negative).unwrap()),
        (
            "BAD-3".to_owned(),
            serde_json::to_vec(&unversioned).unwrap(),
        ),
        ("BAD-4".to_owned(), b"[1, 2]".to_vec()),
    ];
    // Refused ones in between, not at the end: what follows must flow.
    for (i, r) in refused.into_iter().enumerate() {
        all.insert(10 + i * 15, r);
    }
    (all, 4)
}

fn ingest_inbox(db: &testkit::TestDb) -> (Inbox<ingest::Ingest>, ConsumerMetrics) {
    let metrics = ConsumerMetrics::unregistered();
    let store = store::Store::new(db.pool.clone());
    let inbox = Inbox::new(
        db.pool.clone(),
        ingest::CONSUMER,
        ingest::Ingest::new(store),
        metrics.clone(),
    )
    .with_transactions(2);
    (inbox, metrics)
}

async fn until_ingested(db: &testkit::TestDb, versions: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if n >= versions {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} of {versions} versions ingested"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each order at the version count sent, with the newest content, and 1C's
/// one pending row carrying its newest version; the refused orders nowhere.
async fn assert_saved_once_per_version(db: &testkit::TestDb) {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT id, version, executor FROM orders ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows.len(),
        40,
        "the refused orders were saved, or some were lost"
    );
    let snapshots: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregateid, version FROM outbox WHERE destination = 'onec' ORDER BY aggregateid",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let saved: Vec<(String, i64)> = rows.iter().map(|(id, v, _)| (id.clone(), *v)).collect();
    assert_eq!(
        snapshots, saved,
        "one 1C row per order, at its newest version"
    );
    for (id, version, executor) in rows {
        let n: usize = id.trim_start_matches("ING-").parse().unwrap();
        // (applied versions, the newest sent)
        let (applied, newest) = match n {
            0..20 => (2, 2),
            30 => (2, 3),
            _ => (1, 1),
        };
        assert_eq!(
            version, applied,
            "{id}: a version applied twice or not at all"
        );
        assert_eq!(executor, format!("v{newest}"), "{id}: an older version won");
    }
}

fn assert_problem(class: &str, reason: &str) {
    let p: serde_json::Value = serde_json::from_str(reason)
        .unwrap_or_else(|e| panic!("{class}: the reason is not problem+json ({e}): {reason}"));
    assert!(matches!(p["status"].as_u64(), Some(400 | 422)), "{p}");
    assert!(p["type"]
        .as_str()
        .unwrap()
        .starts_with("urn:orders-center:problem:"));
    assert!(matches!(class, "bad_json" | "invalid"), "{class}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_ingestion_saves_each_version_once_and_buries_refusals_with_problems() {
    let db = testkit::database().await;
    let kafka = testkit::kafka().await;
    let mut config = KafkaConfig::new(&kafka.bootstrap_servers());
    config.topic_prefix = testkit::unique_prefix("t");
    config.ensure_topics(&[SOURCE]).await.unwrap();
    let producer = config.producer().unwrap();
    let topic = config.topic(SOURCE);
    let (all, refused) = messages();
    for (key, body) in &all {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .key(key)
                    .payload(body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let (inbox, metrics) = ingest_inbox(&db);
    let cancel = CancellationToken::new();
    let subscription = KafkaSubscription {
        topics: vec![topic.clone()],
        group: format!("{}ingest", config.topic_prefix),
        batch: 16,
    };
    let consumer = {
        let (config, cancel) = (config.clone(), cancel.clone());
        tokio::spawn(async move {
            brokers::kafka::consume(&config, &subscription, &inbox, cancel)
                .await
                .unwrap()
        })
    };
    until_ingested(&db, 62).await;

    let reader: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", format!("{}dead-reader", config.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&dead_topic(&topic)]).unwrap();
    let mut stream = reader.stream();
    for _ in 0..refused {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a dead letter within 60 s")
            .unwrap()
            .unwrap();
        let header = |name: &str| {
            let h = m.headers().unwrap();
            let v = h
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .unwrap();
            String::from_utf8(v.to_vec()).unwrap()
        };
        assert!(
            m.key().unwrap().starts_with(b"BAD-"),
            "a good order was buried"
        );
        assert_problem(
            &header(brokers::headers::DEAD_CLASS),
            &header(brokers::headers::DEAD_REASON),
        );
    }
    cancel.cancel();
    consumer.await.unwrap();
    assert_saved_once_per_version(&db).await;
    assert_eq!(metrics.count(ingest::CONSUMER, "duplicate"), 10);
    assert_eq!(metrics.count(ingest::CONSUMER, "dead"), refused as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_ingestion_saves_each_version_once_and_buries_refusals_with_problems() {
    let db = testkit::database().await;
    let rabbit = testkit::rabbitmq().await;
    let mut config = RabbitConfig::new(&rabbit.url());
    config.prefix = testkit::unique_prefix("t");
    let subscription = RabbitSubscription {
        aggregate_type: SOURCE.into(),
        events: vec!["#".into()],
        prefetch: 16,
    };
    brokers::rabbitmq::declare(&config, ingest::CONSUMER, &subscription)
        .await
        .unwrap();
    let (_connection, channel) = config.confirmed_channel().await.unwrap();
    let (all, refused) = messages();
    for (_, body) in &all {
        let confirm = channel
            .basic_publish(
                config.exchange(SOURCE).as_str().into(),
                "order".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack() && confirm.take_message().is_none());
    }
    let (inbox, metrics) = ingest_inbox(&db);
    let cancel = CancellationToken::new();
    let consumer = {
        let (config, cancel) = (config.clone(), cancel.clone());
        tokio::spawn(async move {
            brokers::rabbitmq::consume(&config, &subscription, &inbox, cancel)
                .await
                .unwrap()
        })
    };
    until_ingested(&db, 62).await;
    let dead = channel
        .basic_consume(
            dead_queue(&config.queue(ingest::CONSUMER, SOURCE))
                .as_str()
                .into(),
            "dead-reader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let letters = tokio::time::timeout(
        Duration::from_secs(30),
        dead.take(refused).collect::<Vec<_>>(),
    )
    .await
    .expect("every dead letter within 30 s");
    for letter in letters {
        let d = letter.unwrap();
        let table = d.properties.headers().clone().unwrap_or_default();
        let text = |key: &str| match table.inner().get(key) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("{key}: {other:?}"),
        };
        assert_problem(
            &text(brokers::headers::DEAD_CLASS),
            &text(brokers::headers::DEAD_REASON),
        );
    }
    cancel.cancel();
    consumer.await.unwrap();
    assert_saved_once_per_version(&db).await;
    assert_eq!(metrics.count(ingest::CONSUMER, "duplicate"), 10);
    assert_eq!(metrics.count(ingest::CONSUMER, "dead"), refused as u64);
}

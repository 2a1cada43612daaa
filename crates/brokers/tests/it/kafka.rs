use std::time::Duration;

use brokers::headers;
use brokers::kafka::{
    consume, dead_topic, KafkaConfig, KafkaSink, KafkaSubscription, TransactionalSink,
};
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _};
use tokio_util::sync::CancellationToken;

use crate::*;

/// A consumer of `topic`'s dead-letter topic, from its start.
fn dead_reader(config: &KafkaConfig, topic: &str) -> StreamConsumer {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("group.id", format!("{}dead-reader", config.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&dead_topic(topic)]).unwrap();
    reader
}

/// Every event id a `read_committed` consumer finds on the `order` topic
/// within `wait`, in the order read per key.
async fn committed(config: &KafkaConfig, wait: Duration) -> Vec<(String, String)> {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set(
            "group.id",
            format!("{}committed-{}", config.topic_prefix, uuid::Uuid::now_v7()),
        )
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    reader.subscribe(&[&config.topic("order")]).unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, reader.stream().next()).await {
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let id = m
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == headers::EVENT_ID)
            .map(|h| String::from_utf8(h.value.unwrap().to_vec()).unwrap())
            .unwrap();
        seen.push((key, id));
    }
    seen
}

fn ids(messages: &[Message]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| (m.aggregate_id.clone(), m.event_id.to_string()))
        .collect()
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_is_one_transaction_and_an_aborted_one_leaves_nothing_visible() {
    let (_db, config) = setup().await;
    let sink = TransactionalSink::new(config.clone(), "log-a", "kafka").unwrap();
    let first: Vec<Message> = notices(20, 1).iter().map(message).collect();
    let outcomes = sink.deliver_run(0, &first).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");

    // A record too large for Kafka in the middle of a run: the transaction
    // with the records before it aborts, the rest go out in a second one,
    // and the large one is refused for good.
    let mut second: Vec<Message> = notices(20, 2).iter().skip(20).map(message).collect();
    let huge = serde_json::json!({"padding": "x".repeat(2_000_000)});
    second[10].payload = serde_json::value::to_raw_value(&huge).unwrap();
    let outcomes = sink.deliver_run(0, &second).await;
    let classes: Vec<_> = outcomes
        .iter()
        .map(|o| o.as_ref().map_or_else(|f| f.class, |()| "ok"))
        .collect();
    assert_eq!(
        classes.iter().filter(|c| **c == "ok").count(),
        19,
        "{classes:?}"
    );
    assert_eq!(classes[10], "rejected");

    let mut expected = ids(&first);
    expected.extend(
        ids(&second)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != 10)
            .map(|(_, id)| id),
    );
    let seen = committed(&config, Duration::from_secs(15)).await;
    assert_eq!(
        sorted(seen.clone()),
        sorted(expected),
        "each committed record once; nothing of the aborted transaction"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitions_new_holder_fences_the_old_one() {
    let (_db, config) = setup().await;
    let old = TransactionalSink::new(config.clone(), "log-a", "kafka").unwrap();
    let new = TransactionalSink::new(config.clone(), "log-a", "kafka").unwrap();
    let runs: Vec<Vec<Message>> = notices(30, 1)
        .chunks(10)
        .map(|c| c.iter().map(message).collect())
        .collect();
    assert!(old.deliver_run(3, &runs[0]).await.iter().all(Result::is_ok));
    assert!(new.deliver_run(3, &runs[1]).await.iter().all(Result::is_ok));
    let outcomes = old.deliver_run(3, &runs[2]).await;
    assert!(
        outcomes
            .iter()
            .all(|o| o.as_ref().is_err_and(|f| f.class == "fenced")),
        "the old holder is fenced: {outcomes:?}"
    );
    let seen = committed(&config, Duration::from_secs(15)).await;
    let mut expected = ids(&runs[0]);
    expected.extend(ids(&runs[1]));
    assert_eq!(sorted(seen), sorted(expected), "nothing of the fenced run");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_partition_of_two_logs_never_fences() {
    // The orders database and a saga service's database both publish their
    // log's partition 3 to Kafka; each holder keeps its transactions.
    let (_db, config) = setup().await;
    let orders = TransactionalSink::new(config.clone(), "log-a", "kafka").unwrap();
    let service = TransactionalSink::new(config.clone(), "log-b", "kafka").unwrap();
    let runs: Vec<Vec<Message>> = notices(40, 1)
        .chunks(10)
        .map(|c| c.iter().map(message).collect())
        .collect();
    for (i, run) in runs.iter().enumerate() {
        let sink = if i % 2 == 0 { &orders } else { &service };
        let outcomes = sink.deliver_run(3, run).await;
        assert!(outcomes.iter().all(Result::is_ok), "run {i}: {outcomes:?}");
    }
    let seen = committed(&config, Duration::from_secs(15)).await;
    let expected: Vec<_> = runs.iter().flat_map(|r| ids(r)).collect();
    assert_eq!(sorted(seen), sorted(expected), "every run of both logs");
}

async fn setup() -> (testkit::TestDb, KafkaConfig) {
    let db = testkit::database().await;
    let kafka = testkit::kafka().await;
    let mut config = KafkaConfig::new(&kafka.bootstrap_servers());
    config.topic_prefix = testkit::unique_prefix("t");
    config.partitions = 3;
    config.ensure_topics(&["order"]).await.unwrap();
    (db, config)
}

fn start_journal(
    config: &KafkaConfig,
    pool: &sqlx::PgPool,
) -> (
    ConsumerMetrics,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (inbox, metrics) = journal(pool);
    let subscription = KafkaSubscription {
        topics: vec![config.topic("order")],
        group: format!("{}journal", config.topic_prefix),
        batch: 100,
    };
    let cancel = CancellationToken::new();
    let (config, stop) = (config.clone(), cancel.clone());
    let task = tokio::spawn(async move {
        consume(&config, &subscription, &inbox, stop).await.unwrap();
    });
    (metrics, cancel, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_batch_reaches_the_journal_once_and_in_order_through_kafka() {
    let (db, config) = setup().await;
    let sink = KafkaSink::new(config.clone()).unwrap();
    batches_reach_the_journal_once_and_in_order(&sink, &db.pool, || {
        start_journal(&config, &db.pool)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_reaches_the_journal_once_and_in_order_through_kafka() {
    let (db, config) = setup().await;
    let sink = KafkaSink::new(config.clone()).unwrap();
    every_event_once_in_order(&sink, &db.pool, || start_journal(&config, &db.pool)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_goes_to_the_dead_topic_with_its_reason_and_the_rest_flows() {
    let (db, config) = setup().await;
    let producer: FutureProducer = config.producer().unwrap();
    let good = notices(1, 2);
    let topic = config.topic("order");
    // All on one key, so one partition: the poison sits between the two
    // good messages.
    let poison = poison_bodies();
    let mut bodies = vec![("good", serde_json::to_vec(&good[0]).unwrap())];
    bodies.extend(poison.clone());
    bodies.push(("good", serde_json::to_vec(&good[1]).unwrap()));
    for (i, (_, body)) in bodies.iter().enumerate() {
        let id = if i == 0 {
            good[0].idempotent_key.to_string()
        } else if i == bodies.len() - 1 {
            good[1].idempotent_key.to_string()
        } else {
            uuid::Uuid::now_v7().to_string()
        };
        let h = OwnedHeaders::new().insert(Header {
            key: headers::EVENT_ID,
            value: Some(&id),
        });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("ORD-0")
                    .payload(body)
                    .headers(h),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let (metrics, cancel, task) = start_journal(&config, &db.pool);
    journal_reaches(&db.pool, 2).await;
    let reader = dead_reader(&config, &topic);
    let mut dead = Vec::new();
    let mut stream = reader.stream();
    while dead.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("three dead letters within 60 s")
            .unwrap()
            .unwrap();
        let header = |key: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == key))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        dead.push((
            header(headers::DEAD_CLASS),
            header(headers::DEAD_REASON),
            m.payload().unwrap_or_default().to_vec(),
        ));
    }
    cancel.cancel();
    task.await.unwrap();
    for ((class, reason, body), (want_class, want_body)) in dead.iter().zip(&poison) {
        assert_eq!(class, want_class);
        assert!(!reason.is_empty(), "{class} carries its reason");
        assert_eq!(body, want_body, "the dead letter keeps the body");
    }
    assert_each_once_in_order(&db.pool, &good).await;
    assert_eq!(metrics.count("journal", "dead"), 3);
}

/// Produces `records` (key, body) on one key's partition of `topic`, each
/// with a fresh event id, through a producer that takes records up to the
/// broker's limit.
async fn produce_raw(config: &KafkaConfig, topic: &str, records: &[(Vec<u8>, Vec<u8>, String)]) {
    let producer = config.dead_letter_producer().unwrap();
    for (key, body, id) in records {
        let h = OwnedHeaders::new().insert(Header {
            key: headers::EVENT_ID,
            value: Some(id),
        });
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(body).headers(h),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// `good[0]`, then `poison`, then `good[1]`: in that order on a topic of
/// one partition, whatever the keys.
fn around(
    good: &[OrderNotice],
    poison: Vec<(Vec<u8>, Vec<u8>)>,
) -> Vec<(Vec<u8>, Vec<u8>, String)> {
    let record = |n: &OrderNotice| {
        (
            b"ORD-0".to_vec(),
            serde_json::to_vec(n).unwrap(),
            n.idempotent_key.to_string(),
        )
    };
    let mut all = vec![record(&good[0])];
    all.extend(
        poison
            .into_iter()
            .map(|(k, v)| (k, v, uuid::Uuid::now_v7().to_string())),
    );
    all.push(record(&good[1]));
    all
}

/// A config whose topics have one partition each, `<topic>.dead` taking
/// records up to `dead_max_bytes` when given.
async fn one_partition(dead_max_bytes: Option<&str>) -> (testkit::TestDb, KafkaConfig) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let db = testkit::database().await;
    let kafka = testkit::kafka().await;
    let mut config = KafkaConfig::new(&kafka.bootstrap_servers());
    config.topic_prefix = testkit::unique_prefix("t");
    config.partitions = 1;
    if let Some(max) = dead_max_bytes {
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .create()
            .unwrap();
        let dead = dead_topic(&config.topic("order"));
        let topic =
            NewTopic::new(&dead, 1, TopicReplication::Fixed(1)).set("max.message.bytes", max);
        for r in admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    }
    config.ensure_topics(&["order"]).await.unwrap();
    (db, config)
}

#[tokio::test(flavor = "multi_thread")]
async fn records_over_the_clients_default_limit_reach_the_dead_topic_and_the_rest_flows() {
    let (db, config) = one_partition(None).await;
    let topic = config.topic("order");
    let good = notices(1, 2);
    // librdkafka's default message.max.bytes is 1,000,000; the broker's
    // limit is about 1,048,588.
    let poison = vec![
        (b"ORD-0".to_vec(), vec![b'x'; 1_040_000]),
        (vec![b'k'; 500_000], vec![b'x'; 500_000]),
    ];
    produce_raw(&config, &topic, &around(&good, poison.clone())).await;
    let (metrics, cancel, task) = start_journal(&config, &db.pool);
    journal_reaches(&db.pool, 2).await;
    let reader = dead_reader(&config, &topic);
    let mut stream = reader.stream();
    for (key, body) in &poison {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("each dead letter within 60 s")
            .unwrap()
            .unwrap();
        assert_eq!(m.key(), Some(key.as_slice()));
        assert_eq!(m.payload(), Some(body.as_slice()));
    }
    cancel.cancel();
    task.await.unwrap();
    assert_each_once_in_order(&db.pool, &good).await;
    assert_eq!(metrics.count("journal", "dead"), 2);
    assert!(metrics.stalled(Duration::ZERO).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_the_broker_refuses_is_kept_in_the_database_and_the_rest_flows() {
    let (db, config) = one_partition(Some("100000")).await;
    let topic = config.topic("order");
    let good = notices(1, 2);
    let poison = vec![(b"ORD-0".to_vec(), vec![b'x'; 300_000])];
    produce_raw(&config, &topic, &around(&good, poison)).await;
    let (metrics, cancel, task) = start_journal(&config, &db.pool);
    journal_reaches(&db.pool, 2).await;
    cancel.cancel();
    task.await.unwrap();
    assert_each_once_in_order(&db.pool, &good).await;
    let (origin, class, refused, size, head): (String, String, String, i64, i32) = sqlx::query_as(
        "SELECT origin, class, refused, payload_size, length(payload_head) FROM dead_letters",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(origin, format!("{topic}/0@1"));
    assert_eq!(class, "bad_json");
    assert!(refused.contains(&dead_topic(&topic)), "{refused}");
    assert_eq!((size, head), (300_000, 65_536));
    assert_eq!(metrics.count("journal", "dead"), 1);
}

use std::time::Duration;

use brokers::headers;
use brokers::rabbitmq::{
    consume, dead_queue, declare, RabbitConfig, RabbitSink, RabbitSubscription,
};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use sink::{FailureKind, Sink};
use tokio_util::sync::CancellationToken;

use crate::*;

/// A database and names of its own; the journal's queue is declared.
async fn setup() -> (testkit::TestDb, RabbitConfig) {
    let db = testkit::database().await;
    let rabbit = testkit::rabbitmq().await;
    let mut config = RabbitConfig::new(&rabbit.url());
    config.prefix = testkit::unique_prefix("t");
    declare(&config, "journal", &subscription()).await.unwrap();
    (db, config)
}

fn subscription() -> RabbitSubscription {
    RabbitSubscription {
        aggregate_type: "order".into(),
        events: domain::OrderEvent::ALL
            .map(|e| e.as_str().to_owned())
            .to_vec(),
        prefetch: 200,
    }
}

fn start_journal(
    config: &RabbitConfig,
    pool: &sqlx::PgPool,
) -> (
    ConsumerMetrics,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (inbox, metrics) = journal(pool);
    let cancel = CancellationToken::new();
    let (config, stop) = (config.clone(), cancel.clone());
    let task = tokio::spawn(async move {
        consume(&config, &subscription(), &inbox, stop)
            .await
            .unwrap();
    });
    (metrics, cancel, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_reaches_the_journal_once_and_in_order_through_rabbitmq() {
    let (db, config) = setup().await;
    let sink = RabbitSink::new(config.clone());
    every_event_once_in_order(&sink, &db.pool, || start_journal(&config, &db.pool)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_confirmed_in_bulk_reaches_the_journal_once_and_in_order() {
    let (db, config) = setup().await;
    let sink = RabbitSink::new(config.clone());
    batches_reach_the_journal_once_and_in_order(&sink, &db.pool, || {
        start_journal(&config, &db.pool)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn in_a_batch_a_message_no_queue_takes_fails_alone() {
    let (_db, config) = setup().await;
    let sink = RabbitSink::new(config);
    let mut batch: Vec<_> = notices(3, 1).iter().map(message).collect();
    batch[1].aggregate_type = "nobody-listens".into();
    let outcomes = sink.deliver_batch(&batch).await;
    let classes: Vec<_> = outcomes
        .iter()
        .map(|o| o.as_ref().map_or_else(|f| f.class, |()| "ok"))
        .collect();
    assert_eq!(classes, ["ok", "unroutable", "ok"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_no_queue_takes_is_a_failure_not_a_success() {
    let (_db, config) = setup().await;
    let sink = RabbitSink::new(config);
    let mut m = message(&notices(1, 1)[0]);
    m.aggregate_type = "nobody-listens".into();
    let failure = sink.deliver(&m).await.unwrap_err();
    assert_eq!(
        (failure.kind, failure.class),
        (FailureKind::Transient, "unroutable")
    );
    assert!(!failure.counts_against_destination);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_goes_to_the_dead_queue_with_its_reason_and_the_rest_flows() {
    let (db, config) = setup().await;
    let (_connection, channel) = config.confirmed_channel().await.unwrap();
    let good = notices(1, 2);
    let poison = poison_bodies();
    let mut bodies = vec![(
        serde_json::to_vec(&good[0]).unwrap(),
        good[0].idempotent_key,
    )];
    bodies.extend(
        poison
            .clone()
            .into_iter()
            .map(|(_, b)| (b, uuid::Uuid::now_v7())),
    );
    bodies.push((
        serde_json::to_vec(&good[1]).unwrap(),
        good[1].idempotent_key,
    ));
    for (body, id) in &bodies {
        let confirm = channel
            .basic_publish(
                config.exchange("order").as_str().into(),
                "order.updated".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default().with_message_id(id.to_string().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack() && confirm.take_message().is_none());
    }

    let (metrics, cancel, task) = start_journal(&config, &db.pool);
    journal_reaches(&db.pool, 2).await;
    let dead = channel
        .basic_consume(
            dead_queue(&config.queue("journal", "order"))
                .as_str()
                .into(),
            "dead-reader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let letters = tokio::time::timeout(Duration::from_secs(30), dead.take(3).collect::<Vec<_>>())
        .await
        .expect("three dead letters within 30 s");
    cancel.cancel();
    task.await.unwrap();
    for (letter, (want_class, want_body)) in letters.into_iter().zip(poison) {
        let d = letter.unwrap();
        let table = d.properties.headers().clone().unwrap_or_default();
        let text = |key: &str| match table.inner().get(key) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(text(headers::DEAD_CLASS), want_class);
        assert!(!text(headers::DEAD_REASON).is_empty());
        assert_eq!(d.data, want_body, "the dead letter keeps the body");
    }
    assert_each_once_in_order(&db.pool, &good).await;
    assert_eq!(metrics.count("journal", "dead"), 3);
}

/// `f`'s first `Some` within 30 s.
async fn until_some<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..300 {
        if let Some(t) = f() {
            return Some(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Properties lapin cannot parse (short strings that are not UTF-8), as a
/// producer of another team can publish them.
fn unparsable_properties() -> Vec<testkit::amqp::RawProperties> {
    vec![
        testkit::amqp::RawProperties {
            message_id: Some(vec![0xff, 0xfe]),
            ..Default::default()
        },
        testkit::amqp::RawProperties {
            content_type: Some(vec![0xff, 0xfe]),
            message_id: Some(b"m-1".to_vec()),
        },
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_the_client_cannot_parse_is_dead_lettered_and_the_messages_behind_it_go_on() {
    let (db, config) = setup().await;
    let port = testkit::rabbitmq().await.port();
    let exchange = config.exchange("order");
    let good = notices(1, 2);
    let publish = |n: &OrderNotice| testkit::amqp::RawProperties {
        message_id: Some(n.idempotent_key.to_string().into_bytes()),
        ..Default::default()
    };
    let body = |n: &OrderNotice| serde_json::to_vec(n).unwrap();
    testkit::amqp::publish(
        port,
        &exchange,
        "order.updated",
        &publish(&good[0]),
        &body(&good[0]),
    )
    .unwrap();
    let poison = unparsable_properties();
    for p in &poison {
        testkit::amqp::publish(port, &exchange, "order.updated", p, b"{}").unwrap();
    }
    testkit::amqp::publish(
        port,
        &exchange,
        "order.updated",
        &publish(&good[1]),
        &body(&good[1]),
    )
    .unwrap();

    let started = std::time::Instant::now();
    let (_metrics, cancel, task) = start_journal(&config, &db.pool);
    journal_reaches(&db.pool, 2).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "the canary took {took:?}");
    assert_each_once_in_order(&db.pool, &good).await;
    // Each delivery of a poison costs a reconnection (about a second), so
    // the broker dead-letters it a few seconds after its limit of 5.
    let dead = dead_queue(&config.queue("journal", "order"));
    for _ in &poison {
        let letter = until_some(|| testkit::amqp::get(port, &dead).unwrap())
            .await
            .expect("each unparsable message is a dead letter");
        assert!(
            letter.properties_mention("delivery_limit"),
            "the broker says why: {:?}",
            String::from_utf8_lossy(&letter.properties)
        );
        assert_eq!(letter.body, b"{}");
    }
    cancel.cancel();
    task.await.unwrap();
    assert!(
        testkit::amqp::get(port, &dead).unwrap().is_none(),
        "nothing else is dead"
    );
}

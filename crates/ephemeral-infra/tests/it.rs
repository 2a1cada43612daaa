//! Each server really serves: a message makes a round trip through RabbitMQ
//! and through Kafka with the clients the project uses, the API server
//! answers kubectl, and everything is gone after drop.

use std::time::Duration;

use ephemeral_infra::{Kafka, KubeApi, RabbitMq};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread")]
async fn a_message_round_trips_through_the_embedded_kafka() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{ClientConfig, Message};

    let kafka = tokio::task::spawn_blocking(Kafka::start)
        .await
        .unwrap()
        .unwrap();
    let dir = kafka.dir().to_owned();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "event-id",
        value: Some("e-1"),
    });
    let delivery = producer
        .send(
            FutureRecord::to("round-trip")
                .key("ORD-1")
                .payload("{\"version\":1}")
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the broker acknowledges the record");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", "round-trip-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["round-trip"]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a record within 60 s")
        .unwrap();
    assert_eq!(
        (message.partition(), message.offset()),
        (delivery.partition, delivery.offset)
    );
    assert_eq!(message.key(), Some(&b"ORD-1"[..]));
    assert_eq!(message.payload(), Some(&b"{\"version\":1}"[..]));
    let header = message.headers().unwrap().get(0);
    assert_eq!((header.key, header.value), ("event-id", Some(&b"e-1"[..])));

    // librdkafka's destroy waits until every message handed out is freed.
    drop(message);
    drop(consumer);
    drop(producer);
    kafka.stop();
    assert!(!dir.exists(), "the broker's directory is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_message_round_trips_through_the_throwaway_rabbitmq() {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let rabbit = tokio::task::spawn_blocking(RabbitMq::start)
        .await
        .unwrap()
        .unwrap();
    let (dir, port) = (rabbit.dir().to_owned(), rabbit.port());
    let connection = Connection::connect(&rabbit.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare("round-trip".into(), durable, FieldTable::default())
        .await
        .unwrap();
    let confirm = channel
        .basic_publish(
            "".into(),
            "round-trip".into(),
            BasicPublishOptions::default(),
            b"{\"version\":1}",
            BasicProperties::default().with_message_id("e-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirm.is_ack(),
        "the broker confirms the message: {confirm:?}"
    );

    let mut consumer = channel
        .basic_consume(
            "round-trip".into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("a delivery within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, b"{\"version\":1}");
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("e-1")
    );
    delivery.ack(BasicAckOptions::default()).await.unwrap();

    connection.close(200, "done".into()).await.unwrap();
    rabbit.stop();
    assert!(!dir.exists(), "the node's directory is removed");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn the_api_server_serves_kubectl_with_rbac_on_and_is_removed_on_drop() {
    let api = KubeApi::start().unwrap();
    let dir = api.dir().to_owned();
    let out = api
        .kubectl()
        .args(["get", "namespace", "default", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/default"
    );
    // RBAC is on: a service account with no binding may not list anything.
    let out = api
        .kubectl()
        .args(["auth", "can-i", "list", "pods"])
        .arg("--as=system:serviceaccount:default:nobody")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no");
    drop(api);
    assert!(!dir.exists(), "the server's directory is removed");
}

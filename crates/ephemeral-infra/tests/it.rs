//! Each server really serves: a message makes a round trip through RabbitMQ
//! and through Kafka with the clients the project uses, the API server
//! answers kubectl, and everything is gone after drop.

use std::time::Duration;

use ephemeral_infra::{Kafka, KubeApi, RabbitMq};
use futures::StreamExt;
use sha2::{Digest, Sha256};

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

/// The image without Docker: an OCI layout whose digests hold, whose layer
/// has the binary, its libraries, the CA bundle and a nonroot user, all
/// root-owned at time 0, and which runs as that user in a chroot of its
/// own files, also through a symlink (as busybox applets are packed).
#[test]
fn the_image_is_an_oci_layout_that_runs_on_its_own_files() {
    use ephemeral_infra::image::{pack, Contents};
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let contents = Contents::parse(
        "binary /usr/bin/true /usr/local/bin/true\nlink true /usr/local/bin/yes-sir\n\
         user 65532:65532\n\
         entrypoint /usr/local/bin/true\ncmd --version\nexpose 8080\n",
        std::path::Path::new("/"),
    )
    .unwrap();
    let out = dir.path().join("image.tar");
    let image = pack(&contents, "true-test:1", &out).unwrap();
    let again = pack(&contents, "true-test:1", &dir.path().join("again.tar")).unwrap();
    assert_eq!(
        image.digest, again.digest,
        "the same inputs, the same image"
    );

    let mut blobs = std::collections::HashMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(&out).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        blobs.insert(path, bytes);
    }
    let json = |path: &str| -> serde_json::Value { serde_json::from_slice(&blobs[path]).unwrap() };
    let blob = |digest: &serde_json::Value| {
        let hex = digest.as_str().unwrap().trim_start_matches("sha256:");
        let bytes = &blobs[&format!("blobs/sha256/{hex}")];
        assert_eq!(
            format!("{:x}", Sha256::digest(bytes)),
            hex,
            "a blob matches its digest"
        );
        bytes.clone()
    };
    assert!(blobs.contains_key("oci-layout"));
    let index = json("index.json");
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["io.containerd.image.name"],
        "docker.io/library/true-test:1"
    );
    assert_eq!(entry["digest"], image.digest.as_str());
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&entry["digest"])).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/true"])
    );
    assert_eq!(
        config["config"]["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}})
    );
    let gz = blob(&manifest["layers"][0]["digest"]);
    let mut layer = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut layer)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str().unwrap(),
        format!("sha256:{:x}", Sha256::digest(&layer))
    );

    let rootfs = dir.path().join("rootfs");
    let mut names = Vec::new();
    for entry in tar::Archive::new(&layer[..]).entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
            (0, 0, 0)
        );
        names.push(entry.path().unwrap().to_string_lossy().into_owned());
    }
    for want in [
        "usr/local/bin/true",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    assert!(names.iter().any(|n| n.contains("libc.so")), "{names:?}");
    assert!(names.iter().any(|n| n.contains("ld-linux")), "{names:?}");
    tar::Archive::new(&layer[..]).unpack(&rootfs).unwrap();
    // Only root may chroot; CI runs as root.
    for binary in ["/usr/local/bin/true", "/usr/local/bin/yes-sir"] {
        let status = std::process::Command::new("chroot")
            .args(["--userspec=65532:65532"])
            .arg(&rootfs)
            .arg(binary)
            .status()
            .unwrap();
        assert!(status.success(), "{binary} runs on the image's files alone");
    }
}

//! An embedded Apache Kafka broker in KRaft mode (one process as broker and
//! controller, no ZooKeeper), run with the installed JVM from the jars that
//! `tests/kafka/pom.xml` names.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cache::{build_once, infra_dir, run, workspace_root};
use crate::watchdog::{free_port, run_dir, with_retries, Watchdog};
use crate::Result;

/// The Kafka release the tests run; `tests/kafka/pom.xml` pins the same.
pub const KAFKA_VERSION: &str = "4.1.1";

// The line KafkaRaftServer logs once the broker serves requests.
const STARTED: &str = "Kafka Server started";

/// Fetches the broker's jars from Maven Central into `target/infra` unless
/// they are there; returns their directory.
pub fn prepare_kafka() -> Result<PathBuf> {
    let libs = infra_dir().join(format!("kafka-{KAFKA_VERSION}"));
    build_once(&libs, |out| {
        run(
            "mvn dependency:copy-dependencies (tests/kafka/pom.xml)",
            Command::new("mvn")
                .args(["-B", "-q", "-f"])
                .arg(workspace_root().join("tests/kafka/pom.xml"))
                .arg("dependency:copy-dependencies")
                .arg(format!("-DoutputDirectory={}", out.display())),
        )
    })?;
    Ok(libs)
}

/// A running throwaway broker. Dropping it kills the JVM and deletes its
/// directory.
#[derive(Debug)]
pub struct Kafka {
    port: u16,
    dir: PathBuf,
    watchdog: Watchdog,
}

impl Kafka {
    /// Formats fresh storage and starts a broker, waiting until it serves
    /// (about 5–10 s; the first call may also fetch the jars).
    pub fn start() -> Result<Self> {
        let libs = prepare_kafka()?;
        with_retries(|| Self::try_start(&libs))
    }

    fn try_start(libs: &Path) -> Result<Self> {
        let dir = run_dir("kafka-")?;
        let (port, controller) = (free_port()?, free_port()?);
        let config = dir.join("server.properties");
        std::fs::write(&config, server_properties(&dir, port, controller))?;
        std::fs::write(dir.join("log4j2.properties"), log_config(&dir))?;
        let java = |main: &str| {
            let mut c = Command::new("java");
            c.arg("-cp")
                .arg(format!("{}/*", libs.display()))
                .arg(format!(
                    "-Dlog4j2.configurationFile={}",
                    dir.join("log4j2.properties").display()
                ))
                .arg(main);
            c
        };
        run(
            "kafka-storage format",
            java("-Xmx128m")
                .arg("kafka.tools.StorageTool")
                .args(["format", "--standalone", "--ignore-formatted", "-t"])
                .arg(cluster_id())
                .arg("-c")
                .arg(&config),
        )?;
        let mut broker = java("-Xmx512m");
        broker.arg("kafka.Kafka").arg(&config);
        let log = dir.join("server.log");
        let mut watchdog = Watchdog::spawn(&broker, &dir.join("stdout.log"), Some(&dir), None)?;
        watchdog.wait_until("kafka", Duration::from_secs(90), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains(STARTED))
        })?;
        Ok(Self {
            port,
            dir,
            watchdog,
        })
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's directory (its log is `server.log`), deleted when it stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Freezes the broker (SIGSTOP to its process group): connections
    /// stay open and go silent, the harshest kind of outage for a client.
    pub fn pause(&self) -> Result<()> {
        self.watchdog.signal("STOP")
    }

    /// Thaws the broker after [`pause`](Self::pause).
    pub fn resume(&self) -> Result<()> {
        self.watchdog.signal("CONT")
    }

    /// Stops the broker, waiting until its files are gone.
    pub fn stop(mut self) {
        self.watchdog.stop();
    }
}

fn server_properties(dir: &Path, port: u16, controller: u16) -> String {
    format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
",
        data = dir.join("data").display()
    )
}

fn log_config(dir: &Path) -> String {
    format!(
        "appender.file.type = File
appender.file.name = file
appender.file.fileName = {}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
",
        dir.join("server.log").display()
    )
}

/// A random cluster id in the form `kafka-storage random-uuid` prints: a
/// UUID's 16 bytes in URL-safe base64 without padding, never starting with
/// `-` (Kafka's own ids avoid it too: `kafka-storage format` would read one
/// as an option, and fail one start in 64).
fn cluster_id() -> String {
    use base64::Engine as _;
    loop {
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(uuid::Uuid::new_v4().as_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pom_pins_the_version_the_helper_caches_under() {
        let pom = std::fs::read_to_string(workspace_root().join("tests/kafka/pom.xml")).unwrap();
        assert!(pom.contains(&format!("<kafka.version>{KAFKA_VERSION}</kafka.version>")));
    }

    #[test]
    fn cluster_ids_have_the_length_kafka_expects() {
        // 1,000 draws would meet a leading '-' about 15 times.
        for _ in 0..1000 {
            let id = cluster_id();
            assert_eq!(id.len(), 22);
            assert!(!id.starts_with('-'), "{id} reads as an option");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}

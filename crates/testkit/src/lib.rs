//! Test support shared by the crates' integration tests.
//!
//! [`database`] gives each test its own freshly migrated database, so tests run
//! in parallel without seeing each other's rows. The server is `DATABASE_URL`
//! when set; otherwise a throwaway cluster under `target/tmp`, started once per
//! test binary and stopped when the binary exits. [`kube_api`] scripts a
//! Kubernetes API server behind a `kube::Client`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use ephemeral_pg::EphemeralPostgres;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};
use tokio::sync::OnceCell;

pub mod amqp;
pub mod http;
pub mod kube_api;
pub mod process;
mod sample;
pub use sample::{sample_order, sample_order_with};

/// A database created for one test.
#[derive(Debug)]
pub struct TestDb {
    /// A pool on the database.
    pub pool: PgPool,
    /// Its URL, for processes the test starts.
    pub url: String,
}

struct Server {
    admin_url: String,
    // Kept for the life of the process; its watchdog stops it on exit.
    _ephemeral: Option<EphemeralPostgres>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static TEMPLATE: OnceCell<String> = OnceCell::const_new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server {
            admin_url: url,
            _ephemeral: None,
        },
        _ => {
            let options = ephemeral_pg::Options {
                parent_dir: target_tmp(),
                ..Default::default()
            };
            let pg = EphemeralPostgres::start(&options)
                .unwrap_or_else(|e| panic!("no DATABASE_URL and no throwaway PostgreSQL: {e}"));
            Server {
                admin_url: pg.url(),
                _ephemeral: Some(pg),
            }
        }
    })
}

/// `tmp` in the cargo target directory of the running binary, where every
/// throwaway server of the tests lives.
pub fn target_tmp() -> PathBuf {
    ephemeral_infra::tmp_dir()
}

fn with_database(url: &str, db: &str) -> String {
    let options: PgConnectOptions = url.parse().expect("DATABASE_URL is a PostgreSQL URL");
    options.database(db).to_url_lossy().to_string()
}

/// A new, migrated, empty database for one test.
pub async fn database() -> TestDb {
    let server = server();
    let template = TEMPLATE
        .get_or_init(|| prepare_template(&server.admin_url))
        .await;
    create_database(server, template).await
}

/// A new database without the schema, for testing migrations themselves.
pub async fn unmigrated_database() -> TestDb {
    create_database(server(), "template0").await
}

async fn create_database(server: &Server, template: &str) -> TestDb {
    let name = format!(
        "oc_test_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = PgConnection::connect(&server.admin_url)
        .await
        .expect("connect to the test server");
    admin
        .execute(format!("CREATE DATABASE {name} TEMPLATE {template}").as_str())
        .await
        .expect("create test database");
    admin.close().await.ok();
    let url = with_database(&server.admin_url, &name);
    let pool = PgPool::connect(&url)
        .await
        .expect("connect to test database");
    TestDb { pool, url }
}

/// Drops the databases this process has made so far and writes a
/// checkpoint, so that a timed scenario pays for neither the vacuum nor the
/// dirty pages of the ones before it. Their pools must be done with.
pub async fn settle() {
    let mut admin = PgConnection::connect(&server().admin_url)
        .await
        .expect("connect to the test server");
    let ours: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
            .bind(format!("oc\\_test\\_{}\\_%", std::process::id()))
            .fetch_all(&mut admin)
            .await
            .expect("list this process's databases");
    for db in ours {
        admin
            .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
            .await
            .expect("drop a finished database");
    }
    // Needs a superuser or pg_checkpoint; without it the run is only noisier.
    if let Err(e) = admin.execute("CHECKPOINT").await {
        eprintln!("no checkpoint before the timed scenario: {e}");
    }
    admin.close().await.ok();
}

/// Migrates a template database once per schema version, and drops databases
/// left by test processes that have exited.
async fn prepare_template(admin_url: &str) -> String {
    let checksum: u64 = store::MIGRATOR.iter().fold(0xcbf2_9ce4_8422_2325, |h, m| {
        m.checksum
            .iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
    });
    let template = format!("oc_template_{checksum:016x}");
    let mut admin = PgConnection::connect(admin_url)
        .await
        .expect("connect to the test server");
    // Serializes test processes sharing one server.
    admin
        .execute("SELECT pg_advisory_lock(7243501)")
        .await
        .expect("advisory lock");

    let stale: Vec<(String,)> =
        sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'oc\\_test\\_%'")
            .fetch_all(&mut admin)
            .await
            .expect("list test databases");
    for (db,) in stale {
        let pid = db.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
                .await;
        }
    }

    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut admin)
            .await
            .expect("look up template");
    if !exists {
        admin
            .execute(format!("CREATE DATABASE {template}").as_str())
            .await
            .expect("create template");
        let pool = PgPool::connect(&with_database(admin_url, &template))
            .await
            .expect("connect to template");
        store::migrate(&pool).await.expect("migrate template");
        pool.close().await;
    }
    admin
        .execute("SELECT pg_advisory_unlock(7243501)")
        .await
        .expect("advisory unlock");
    admin.close().await.ok();
    template
}

static KAFKA: OnceCell<ephemeral_infra::Kafka> = OnceCell::const_new();
static RABBITMQ: OnceCell<ephemeral_infra::RabbitMq> = OnceCell::const_new();

/// The embedded Kafka of this test binary, started on first use and
/// stopped when the binary exits. Give each test its own topics.
pub async fn kafka() -> &'static ephemeral_infra::Kafka {
    KAFKA
        .get_or_init(|| async {
            tokio::task::spawn_blocking(ephemeral_infra::Kafka::start)
                .await
                .expect("Kafka start task")
                .unwrap_or_else(|e| {
                    panic!("no embedded Kafka: {e}; `bash scripts/test` installs Java and fetches Kafka's jars")
                })
        })
        .await
}

/// The throwaway RabbitMQ node of this test binary, started on first use
/// and stopped when the binary exits. Give each test its own names.
pub async fn rabbitmq() -> &'static ephemeral_infra::RabbitMq {
    RABBITMQ
        .get_or_init(|| async {
            tokio::task::spawn_blocking(ephemeral_infra::RabbitMq::start)
                .await
                .expect("RabbitMQ start task")
                .unwrap_or_else(|e| {
                    panic!("no RabbitMQ: {e}; `bash scripts/test` installs it (apt-get install rabbitmq-server)")
                })
        })
        .await
}

/// A name no other test of any run uses, e.g. for topics, exchanges and
/// queues: `<prefix>-<pid>-<n>-`.
pub fn unique_prefix(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}-",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

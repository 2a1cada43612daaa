//! The whole configuration: one clap struct, every flag also read from env.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// orders-center: the single source of truth for orders, delivering every
/// save to 1C through a transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "orders-center", version)]
pub struct Config {
    /// PostgreSQL URL. `dev` starts a throwaway server when it is not set.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Most database connections this process opens.
    #[arg(
        long,
        env = "DATABASE_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub database_max_connections: u32,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Which destinations receive which order events, as
    /// `destination=event,...;destination=event,...`. Events:
    /// `order.created`, `order.updated`, `order.status_changed` (updates
    /// that change the status, sent as `order.updated` with
    /// `previous_status`).
    /// Destinations: `onec` (snapshots, latest version wins), `kafka` and
    /// `rabbitmq` (the broker of --broker), `journal` (the journal consumer
    /// in PostgreSQL). By default every version goes to 1C, and every event
    /// to the broker when there is one.
    #[arg(long, env = "EVENT_ROUTES", global = true)]
    pub event_routes: Option<domain::Routes>,

    /// The message broker of order events and consumers:
    /// `kafka://host:port[,host:port]` or
    /// `amqp://user:password@host:port/vhost`.
    #[arg(long, env = "BROKER", global = true, hide_env_values = true)]
    pub broker: Option<brokers::Broker>,

    /// Put before every topic, exchange and queue name, e.g. `staging.`.
    #[arg(long, env = "BROKER_PREFIX", default_value = "", global = true)]
    pub broker_prefix: String,

    /// How long a publish may wait for the broker's acknowledgement (Kafka)
    /// or confirm (RabbitMQ) before it counts as failed. Keep it well under
    /// the relay's claim lease.
    #[arg(long, env = "BROKER_TIMEOUT", default_value = "10s", global = true,
          value_parser = humantime::parse_duration)]
    pub broker_timeout: Duration,

    /// Keys of the saga's streams, `stream=key,...` (at least 32 bytes
    /// each; a stream named twice rotates: the last signs, any verifies).
    /// A relay signs what it publishes on a stream with a key; a consumer
    /// dead-letters an unsigned or forged message on a stream with a key.
    /// Give each role only the keys of its own streams.
    #[arg(long, env = "SAGA_KEYS", global = true, hide_env_values = true)]
    pub saga_keys: Option<sink::signing::Keyring>,

    /// A consumer with messages waiting that has settled nothing for this
    /// long (a message it cannot get past, a dead-letter destination it
    /// cannot reach) turns its process's /readyz to 503.
    #[arg(long, env = "CONSUMER_STALL_AFTER", default_value = "2m", global = true,
          value_parser = humantime::parse_duration)]
    pub consumer_stall_after: Duration,

    /// Start a saga for every order created with a `checkout` (`dev` always
    /// does). Turn it on once inventory, payments, the notifier and
    /// `consume saga` run on --broker; until then a checkout is refused.
    #[arg(long, env = "SAGAS", default_value_t = false, global = true, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub sagas: bool,

    /// How long a saga step (a reservation, a charge, a commit, a
    /// compensation) may go unanswered before the saga compensates (or, once
    /// paid, asks again).
    #[arg(long, env = "SAGA_STEP_TIMEOUT", default_value = "30s", global = true,
          value_parser = humantime::parse_duration)]
    pub saga_step_timeout: Duration,

    /// inventory's own PostgreSQL URL (`inventory`; `dev` creates an
    /// `inventory` database next to DATABASE_URL's when it is not set).
    #[arg(
        long,
        env = "INVENTORY_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub inventory_database_url: Option<String>,

    /// payments' own PostgreSQL URL (`payments`; `dev` creates a `payments`
    /// database next to DATABASE_URL's when it is not set).
    #[arg(
        long,
        env = "PAYMENTS_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub payments_database_url: Option<String>,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

impl Config {
    /// The saga's stream keys; none when not configured.
    pub fn keys(&self) -> sink::signing::Keyring {
        self.saga_keys.clone().unwrap_or_default()
    }

    /// The routes in force: `--event-routes`, or 1C plus the broker; `dev`
    /// without a broker sends every event to the journal in PostgreSQL.
    pub fn routes(&self) -> domain::Routes {
        match (&self.event_routes, &self.broker) {
            (Some(routes), _) => routes.clone(),
            (None, Some(broker)) => every_event(domain::Routes::default(), broker.destination()),
            (None, None) if matches!(self.command, Command::Dev(_)) => {
                every_event(domain::Routes::default(), "journal")
            }
            (None, None) => domain::Routes::default(),
        }
    }

    /// Where saga messages go: the broker; in `dev` without one,
    /// PostgreSQL; otherwise nowhere, and sagas are off.
    pub fn saga_route(&self) -> Option<store::saga::SagaRoute> {
        match &self.broker {
            Some(broker) => Some(store::saga::SagaRoute::Broker(
                broker
                    .destination()
                    .parse()
                    .expect("broker names are destinations"),
            )),
            None if matches!(self.command, Command::Dev(_)) => Some(store::saga::SagaRoute::Local),
            None => None,
        }
    }

    /// Whether orders created with a checkout start sagas here; always in
    /// `dev` and in the orchestrator, which exists to run them.
    pub fn sagas_enabled(&self) -> bool {
        self.sagas
            || match &self.command {
                Command::Dev(_) => true,
                Command::Consume(args) => args.consumer == ConsumerName::Saga,
                _ => false,
            }
    }

    /// How sagas run: not at all unless enabled.
    pub fn saga(&self) -> store::saga::SagaConfig {
        store::saga::SagaConfig {
            route: self.saga_route().filter(|_| self.sagas_enabled()),
            step_timeout: self.saga_step_timeout,
        }
    }

    /// The Kafka settings of `--broker kafka://…`.
    pub fn kafka(&self, bootstrap: &str) -> brokers::kafka::KafkaConfig {
        let mut c = brokers::kafka::KafkaConfig::new(bootstrap);
        c.topic_prefix = self.broker_prefix.clone();
        c.delivery_timeout = self.broker_timeout;
        c
    }

    /// The RabbitMQ settings of `--broker amqp://…`.
    pub fn rabbitmq(&self, url: &str) -> brokers::rabbitmq::RabbitConfig {
        let mut c = brokers::rabbitmq::RabbitConfig::new(url);
        c.prefix = self.broker_prefix.clone();
        c.confirm_timeout = self.broker_timeout;
        c
    }
}

/// `routes` with every order event also sent to `destination`.
pub fn every_event(routes: domain::Routes, destination: &str) -> domain::Routes {
    let destination: domain::Destination = destination.parse().expect("a valid name");
    domain::OrderEvent::ALL
        .into_iter()
        .fold(routes, |r, e| r.with(e, destination.clone()))
}

/// Log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The roles of the binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (and /metrics on the same port).
    Api(ApiArgs),
    /// Deliver the outbox to 1C (`order_eno_1c`); serves /metrics, /healthz
    /// and /readyz.
    Relay(RelayArgs),
    /// Apply the database migrations and exit.
    Migrate,
    /// List or replay outbox tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Run a consumer over the broker of --broker: each message applied once
    /// through the inbox; serves /metrics, /healthz and /readyz.
    Consume(ConsumeArgs),
    /// Everything in one process for a laptop: a throwaway PostgreSQL unless
    /// DATABASE_URL is set, migrations, the API, a relay, the 1C mock, the
    /// journal consumer, and the saga's inventory, payments and notifier
    /// with their own databases (over --broker, or in PostgreSQL without one).
    Dev(DevArgs),
    /// The inventory service (own database, INVENTORY_DATABASE_URL): its
    /// stock API, the consumer of the saga's stock commands over --broker,
    /// and the relay of its answers.
    Inventory(ServiceArgs),
    /// The payments service (own database, PAYMENTS_DATABASE_URL): its
    /// account API, the consumer of the saga's payment commands over
    /// --broker, and the relay of its answers.
    Payments(ServiceArgs),
    /// Ingest whole orders from --broker (topic or exchange `orders.in`):
    /// each saved through the API's validation and save path, once per
    /// version; refused ones dead-lettered with their problem+json reason.
    /// Serves /metrics, /healthz and /readyz.
    Ingest(IngestArgs),
    /// The notifier (no database): consumes the saga's outcomes over
    /// --broker, logs and serves one notification per order, and POSTs
    /// each to --webhook-url if given.
    Notifier(NotifierArgs),
    /// Print the CRD of the `OutboxRelay` resource (what the chart ships in
    /// crds/) as YAML.
    Crdgen,
}

/// Flags of `inventory` and `payments`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Address of the API, /metrics, /healthz and /readyz.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Apply the service's migrations before serving.
    #[arg(long, env = "MIGRATE")]
    pub migrate: bool,

    /// Most messages applied in one inbox transaction.
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 100)]
    pub batch: u16,

    /// Kafka consumers of the group in this process, each with its share of
    /// the partitions, applying in parallel (RabbitMQ: one active consumer
    /// per queue, so this does not apply).
    #[arg(long, env = "CONSUMER_MEMBERS", default_value_t = 1)]
    pub members: usize,

    #[command(flatten)]
    pub tuning: RelayTuning,

    #[command(flatten)]
    pub election: ElectionArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Flags of `notifier`.
#[derive(Debug, Args)]
pub struct NotifierArgs {
    /// Address of /api/v1/notifications, /metrics, /healthz and /readyz.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Most messages handled per batch.
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 100)]
    pub batch: u16,

    #[command(flatten)]
    pub webhook: WebhookArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Where the notifier POSTs.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// POST every notification here (JSON, `Idempotency-Key: <order id>`);
    /// a message is acknowledged only once its POST succeeded.
    #[arg(long, env = "WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// Attempts per notification before its batch goes back to the broker.
    #[arg(long, env = "WEBHOOK_ATTEMPTS", default_value_t = 5)]
    pub webhook_attempts: u32,

    /// Each attempt's timeout.
    #[arg(long, env = "WEBHOOK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
}

impl WebhookArgs {
    /// The webhook, if one is set.
    pub fn webhook(&self) -> Option<notifier::Webhook> {
        self.webhook_url.as_ref().map(|url| notifier::Webhook {
            url: url.clone(),
            attempts: self.webhook_attempts,
            timeout: self.webhook_timeout,
        })
    }
}

/// Flags of `api`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Apply migrations before serving.
    #[arg(long, env = "MIGRATE")]
    pub migrate: bool,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub cache: CacheArgs,
}

/// Flags of `dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Apply migrations before serving (`--migrate=false` to skip).
    #[arg(long, env = "MIGRATE", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub migrate: bool,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// Address of the relay's /metrics, /healthz and /readyz.
    #[arg(long, env = "RELAY_LISTEN_ADDR", default_value = "127.0.0.1:9090")]
    pub relay_listen: SocketAddr,

    /// Address of the in-process 1C mock.
    #[arg(long, env = "ONEC_MOCK_LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub onec_mock_listen: SocketAddr,

    /// Address of inventory's API.
    #[arg(long, env = "INVENTORY_LISTEN_ADDR", default_value = "127.0.0.1:8082")]
    pub inventory_listen: SocketAddr,

    /// Address of payments' API.
    #[arg(long, env = "PAYMENTS_LISTEN_ADDR", default_value = "127.0.0.1:8083")]
    pub payments_listen: SocketAddr,

    /// Address of the notifier's API.
    #[arg(long, env = "NOTIFIER_LISTEN_ADDR", default_value = "127.0.0.1:8084")]
    pub notifier_listen: SocketAddr,

    #[command(flatten)]
    pub webhook: WebhookArgs,

    #[command(flatten)]
    pub relay: RelayTuning,
}

/// The consumers orders-center runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsumerName {
    /// Records every order event in `order_journal`.
    Journal,
    /// The saga's orchestrator: applies inventory's and payments' answers.
    Saga,
}

/// Flags of `consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Which consumer.
    #[arg(value_enum)]
    pub consumer: ConsumerName,

    #[command(flatten)]
    pub run: ConsumerFlags,
}

/// Flags of `ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// The Kafka topic, or the RabbitMQ exchange (read through the queue
    /// `ingest.<source>`), that whole orders arrive on; --broker-prefix goes
    /// before it.
    #[arg(long, env = "INGEST_SOURCE", default_value = ingest::DEFAULT_SOURCE)]
    pub source: String,

    #[command(flatten)]
    pub run: ConsumerFlags,
}

/// How a consumer process reads and serves.
#[derive(Debug, Args)]
pub struct ConsumerFlags {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:9091")]
    pub listen: SocketAddr,

    /// Most messages applied in one inbox transaction (and, on RabbitMQ,
    /// unacknowledged at once).
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 500)]
    pub batch: u16,

    /// Kafka consumers of the group in this process, each with its share of
    /// the partitions, applying in parallel (RabbitMQ: one active consumer
    /// per queue, so this does not apply).
    #[arg(long, env = "CONSUMER_MEMBERS", default_value_t = 1)]
    pub members: usize,

    /// Transactions a batch is split over, by order, and applied at once
    /// (`ingest`; the other consumers apply a batch in one). One order's
    /// messages stay in one transaction, in order.
    #[arg(long, env = "CONSUMER_TRANSACTIONS", default_value_t = ingest::DEFAULT_TRANSACTIONS)]
    pub transactions: usize,

    #[command(flatten)]
    pub http: HttpArgs,
}

/// Flags of `relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,

    /// Base URL of 1C, e.g. `http://onec-mock:8081`.
    #[arg(long, env = "ONEC_URL")]
    pub onec_url: String,

    /// 1C Basic-auth user name.
    #[arg(long, env = "ONEC_USERNAME")]
    pub onec_username: String,

    /// 1C Basic-auth password.
    #[arg(long, env = "ONEC_PASSWORD", hide_env_values = true)]
    pub onec_password: String,

    #[command(flatten)]
    pub tuning: RelayTuning,

    #[command(flatten)]
    pub election: ElectionArgs,

    #[command(flatten)]
    pub resources: ResourceArgs,

    #[command(flatten)]
    pub http: HttpArgs,
}

/// Steering the relay from `OutboxRelay` resources.
#[derive(Debug, Args)]
pub struct ResourceArgs {
    /// Watch the `OutboxRelay` resources (in-cluster or KUBECONFIG): each
    /// destination's spec (paused, limits, batch size, breaker) applies
    /// live over the flags, and the leader writes their status.
    #[arg(long, env = "OUTBOX_RELAY_RESOURCES")]
    pub outbox_relay_resources: bool,

    /// Namespace of the resources; the pod's own by default.
    #[arg(long, env = "OUTBOX_RELAY_NAMESPACE")]
    pub outbox_relay_namespace: Option<String>,

    /// Only resources with these labels, e.g.
    /// `app.kubernetes.io/instance=orders-center`.
    #[arg(long, env = "OUTBOX_RELAY_SELECTOR")]
    pub outbox_relay_selector: Option<String>,
}

/// Leader election backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LeaderElection {
    /// Always the leader: a single relay.
    None,
    /// A lease row in PostgreSQL: no Kubernetes needed, works behind PgBouncer.
    Postgres,
    /// A `coordination.k8s.io/v1` Lease.
    Kube,
}

/// How relays elect the one that runs the maintenance jobs.
#[derive(Debug, Args)]
pub struct ElectionArgs {
    /// Backend.
    #[arg(long, env = "LEADER_ELECTION", value_enum, default_value_t = LeaderElection::None)]
    pub leader_election: LeaderElection,

    /// Name of the Lease (or lease row).
    #[arg(long, env = "LEASE_NAME", default_value = "orders-center-relay")]
    pub lease_name: String,

    /// Namespace of the Lease; the pod's own by default.
    #[arg(long, env = "LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a lease holds without renewal.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// The leader steps down when it could not renew for this long.
    #[arg(long, env = "LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_renew_deadline: Duration,

    /// How often to try to acquire or renew the lease.
    #[arg(long, env = "LEASE_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry_period: Duration,
}

impl ElectionArgs {
    /// The election timing, checked: a leader must step down before its
    /// lease can expire, and must retry before its deadline passes.
    pub fn election_config(&self) -> Result<worker::ElectionConfig, String> {
        if self.lease_renew_deadline >= self.lease_duration {
            return Err("--lease-renew-deadline must be shorter than --lease-duration".into());
        }
        if self.lease_retry_period >= self.lease_renew_deadline {
            return Err("--lease-retry-period must be shorter than --lease-renew-deadline".into());
        }
        Ok(worker::ElectionConfig {
            lease_duration: self.lease_duration,
            renew_deadline: self.lease_renew_deadline,
            retry_period: self.lease_retry_period,
        })
    }
}

/// How a relay claims, retries and protects 1C.
#[derive(Debug, Args)]
pub struct RelayTuning {
    /// This relay's name in `claimed_by`; the pod name on Kubernetes.
    #[arg(long, env = "POD_NAME")]
    pub relay_id: Option<String>,

    /// Most tasks claimed per query.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 100)]
    pub batch_size: u32,

    /// Claim-and-deliver runs that may overlap (the worker pool has one more
    /// worker, for the rescue job).
    #[arg(long, env = "RELAY_CLAIM_LANES", default_value_t = 3)]
    pub claim_lanes: usize,

    /// Most requests to 1C in flight from this relay.
    #[arg(long, env = "ONEC_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,

    /// Most requests per second to 1C from this relay; 0 for no limit.
    #[arg(long, env = "ONEC_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,

    /// Timeout of one request to 1C.
    #[arg(long, env = "ONEC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub onec_timeout: Duration,

    /// After a request with no answer, how long 1C may still apply it: no
    /// newer version of that order is sent before this passes.
    #[arg(long, env = "ONEC_IN_DOUBT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub onec_in_doubt: Duration,

    /// Attempts before a transiently failing task goes dead.
    #[arg(long, env = "RELAY_MAX_ATTEMPTS", default_value_t = 12)]
    pub max_attempts: i32,

    /// First retry delay; it doubles per attempt, with jitter.
    #[arg(long, env = "RELAY_BACKOFF_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,

    /// Longest retry delay.
    #[arg(long, env = "RELAY_BACKOFF_MAX", default_value = "5m", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,

    /// How long a claim holds before another relay may take the task over.
    #[arg(long, env = "RELAY_CLAIM_LEASE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub claim_lease: Duration,

    /// Longest wait between claims when no save wakes the relay.
    #[arg(long, env = "RELAY_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// How often expired claims are rescued.
    #[arg(long, env = "RELAY_RESCUE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub rescue_interval: Duration,

    /// How long done and superseded tasks are kept before the leader deletes them.
    #[arg(long, env = "RELAY_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// How long idempotency keys of creates are kept.
    #[arg(long, env = "IDEMPOTENCY_KEY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_key_ttl: Duration,

    /// How long consumers remember a message id: a redelivery within this
    /// window changes nothing.
    #[arg(long, env = "INBOX_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub inbox_retention: Duration,

    /// How often the leader deletes rows past retention.
    #[arg(long, env = "RELAY_RETENTION_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub retention_interval: Duration,

    /// How often the leader recounts the backlog.
    #[arg(long, env = "RELAY_BACKLOG_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub backlog_interval: Duration,

    /// Most publishes to the broker in flight from this relay.
    #[arg(long, env = "BROKER_MAX_IN_FLIGHT", default_value_t = 2000)]
    pub broker_max_in_flight: usize,

    /// How often the leader looks for sagas whose step is overdue.
    #[arg(long, env = "SAGA_DEADLINE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub saga_deadline_interval: Duration,

    /// Consecutive 1C failures that open the circuit breaker.
    #[arg(long, env = "ONEC_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,

    /// How long the breaker stays open before a probe.
    #[arg(long, env = "ONEC_BREAKER_COOL_DOWN", default_value = "10s", value_parser = humantime::parse_duration)]
    pub breaker_cool_down: Duration,
}

impl RelayTuning {
    /// The relay settings these flags describe.
    pub fn relay_config(&self) -> relay::RelayConfig {
        let relay_id = self.relay_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        relay::RelayConfig {
            service: relay::ServiceConfig {
                relay_id,
                batch_size: self.batch_size.max(1),
                claim_lanes: self.claim_lanes.max(1),
                lease: self.claim_lease,
                max_attempts: self.max_attempts.max(1),
                backoff: worker::Backoff {
                    base: self.backoff_base,
                    max: self.backoff_max,
                },
                poll_interval: self.poll_interval,
                rescue_interval: self.rescue_interval,
                retention: self.retention,
                idempotency_key_ttl: self.idempotency_key_ttl,
                inbox_retention: self.inbox_retention,
                retention_interval: self.retention_interval,
                backlog_interval: self.backlog_interval,
                in_doubt: self.onec_in_doubt,
            },
        }
    }

    /// The limits and breaker in front of 1C.
    pub fn onec_protection(&self) -> relay::ProtectionConfig {
        relay::ProtectionConfig {
            max_in_flight: self.max_in_flight.max(1),
            rate_per_second: std::num::NonZeroU32::new(self.rate_limit),
            breaker: worker::BreakerConfig {
                failure_threshold: self.breaker_failures.max(1),
                cool_down: self.breaker_cool_down,
            },
        }
    }

    /// The limits and breaker in front of the broker.
    pub fn broker_protection(&self) -> relay::ProtectionConfig {
        relay::ProtectionConfig {
            max_in_flight: self.broker_max_in_flight.max(1),
            rate_per_second: None,
            ..self.onec_protection()
        }
    }

    /// 1C as the relay's outlet: snapshots, latest version wins.
    pub fn onec_outlet(&self, client: onec::HttpOnecClient) -> relay::Outlet {
        relay::Outlet {
            destination: domain::Destination::onec(),
            policy: domain::DeliveryPolicy::LatestWins,
            sink: std::sync::Arc::new(onec::OnecSink::new(std::sync::Arc::new(client))),
            protection: self.onec_protection(),
        }
    }

    /// The 1C client settings for `url` and these flags.
    pub fn onec_config(&self, url: &str, username: &str, password: &str) -> onec::OnecConfig {
        onec::OnecConfig {
            base_url: url.to_owned(),
            credentials: onec::Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            },
            timeout: self.onec_timeout,
            max_idle_connections: self.max_in_flight,
        }
    }
}

/// `tasks` subcommands.
#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List tasks in one state, oldest first.
    List {
        /// Only this destination's tasks, e.g. `onec`; all by default.
        #[arg(long)]
        destination: Option<domain::Destination>,
        /// Task state.
        #[arg(long, value_parser = parse_state, default_value = "dead")]
        state: domain::TaskState,
        /// Most tasks to show.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Show tasks after this id.
        #[arg(long)]
        after: Option<i64>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replay dead tasks: pending again now, with a fresh attempt budget.
    /// A dead event of the log goes back to the log.
    Retry {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Show each event-stream destination's log cursors: who holds them,
    /// and how far each is behind, in events and seconds.
    Cursors {
        /// Only this destination's cursors; every destination with a
        /// cursor by default.
        #[arg(long)]
        destination: Option<domain::Destination>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_state(s: &str) -> Result<domain::TaskState, String> {
    domain::TaskState::parse(s).ok_or_else(|| {
        let all: Vec<_> = domain::TaskState::ALL.iter().map(|t| t.as_str()).collect();
        format!("one of {}", all.join(", "))
    })
}

/// The API's read cache of whole orders.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The most memory the cached orders may weigh, e.g. `256MiB`; `0`
    /// turns the cache off (every read goes to the database).
    #[arg(long, env = "CACHE_BUDGET", default_value = "64MiB", value_parser = parse_bytes)]
    pub cache_budget: u64,

    /// Readiness waits for the cache's warm-up from the database at most
    /// this long; past it the replica serves and the warm-up goes on.
    #[arg(long, env = "CACHE_WARMUP_LIMIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cache_warmup_limit: Duration,
}

impl CacheArgs {
    /// The cache's configuration; `None` when it is off.
    pub fn cache_config(&self) -> Option<order_cache::CacheConfig> {
        (self.cache_budget > 0).then_some(order_cache::CacheConfig {
            budget_bytes: self.cache_budget,
            warmup_limit: self.cache_warmup_limit,
        })
    }
}

/// `1048576`, `512KiB`, `64MiB`, `2GiB` (also `KB`, `MB`, `GB` as powers
/// of 1000).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 64MiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?}: use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Limits of every HTTP listener.
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub body_limit_bytes: usize,

    /// Longest a request may take, body included, e.g. `30s`.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Longest a client may take to send its request headers, and longest an
    /// idle connection is kept, e.g. `10s`.
    #[arg(long, env = "HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Most connections served at once; more wait in the listen backlog.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
}

impl HttpArgs {
    /// The listener limits these flags describe.
    pub fn limits(&self) -> http_server::Limits {
        http_server::Limits {
            body_limit: self.body_limit_bytes,
            request_timeout: self.request_timeout,
            header_timeout: self.header_timeout,
            max_connections: self.max_connections,
        }
    }
}

/// Who may call the API (the orders API, inventory's, payments' and the
/// notifier's: one scheme for every role).
#[derive(Debug, Args)]
pub struct AuthArgs {
    /// Bearer tokens accepted on writes and the sync admin endpoints,
    /// comma-separated (several, for rotation). Unset: the API is open.
    #[arg(
        long,
        env = "API_TOKENS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_tokens: Vec<String>,

    /// Require a token on reads too.
    #[arg(long, env = "PROTECT_READS", default_value_t = false, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub protect_reads: bool,
}

impl AuthArgs {
    /// The access control of these flags.
    pub fn config(&self) -> api::AuthConfig {
        api::AuthConfig::new(&self.api_tokens, self.protect_reads)
    }
}

/// The API settings of these flags.
pub fn api_config(http: &HttpArgs, auth: &AuthArgs) -> api::ApiConfig {
    api::ApiConfig {
        limits: http.limits(),
        auth: auth.config(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("MiB").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn sagas_run_where_they_are_switched_on_and_have_a_transport() {
        use store::saga::SagaRoute;
        let route = |args: &[&str]| {
            let args = [&["orders-center"][..], args].concat();
            Config::try_parse_from(args).unwrap().saga().route
        };
        let kafka = Some(SagaRoute::Broker("kafka".parse().unwrap()));
        assert_eq!(route(&["dev"]), Some(SagaRoute::Local));
        assert_eq!(route(&["dev", "--broker", "kafka://k:9092"]), kafka);
        assert_eq!(route(&["api"]), None);
        assert_eq!(route(&["api", "--sagas"]), None, "no broker, no saga");
        assert_eq!(
            route(&["api", "--broker", "kafka://k:9092"]),
            None,
            "not switched on"
        );
        assert_eq!(
            route(&["api", "--broker", "kafka://k:9092", "--sagas"]),
            kafka
        );
        assert_eq!(
            route(&["consume", "saga", "--broker", "kafka://k:9092"]),
            kafka
        );
        assert_eq!(
            route(&["consume", "journal", "--broker", "kafka://k:9092"]),
            None
        );
    }

    /// `relay` with the required 1C flags plus `extra`.
    fn relay_args(extra: &[&str]) -> RelayArgs {
        let required = [
            "orders-center",
            "relay",
            "--onec-url",
            "x",
            "--onec-username",
            "u",
            "--onec-password",
            "p",
        ];
        let args = [&required[..], extra].concat();
        match Config::try_parse_from(args).unwrap().command {
            Command::Relay(r) => r,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn relay_flags_become_relay_settings() {
        let c = relay_args(&[
            "--rate-limit",
            "50",
            "--relay-id",
            "relay-0",
            "--backoff-base",
            "250ms",
        ])
        .tuning;
        let (c, protection) = (c.relay_config(), c.onec_protection());
        assert_eq!(c.service.relay_id, "relay-0");
        assert_eq!(c.service.backoff.base, Duration::from_millis(250));
        assert_eq!(protection.rate_per_second.map(|r| r.get()), Some(50));
        assert_eq!(protection.max_in_flight, 64);
        assert_eq!(
            relay_args(&[]).tuning.onec_protection().rate_per_second,
            None
        );
    }

    #[test]
    fn election_timing_must_let_the_leader_step_down_first() {
        let timing = |extra: &[&str]| relay_args(extra).election.election_config();
        let defaults = timing(&["--leader-election", "kube"]).unwrap();
        assert_eq!(
            (
                defaults.lease_duration,
                defaults.renew_deadline,
                defaults.retry_period
            ),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        assert!(timing(&["--lease-renew-deadline", "15s"]).is_err());
        assert!(timing(&["--lease-retry-period", "10s"]).is_err());
    }

    #[test]
    fn dev_migrates_by_default_and_can_be_told_not_to() {
        let dev = |args: &[&str]| match Config::try_parse_from(args).unwrap().command {
            Command::Dev(d) => d,
            other => panic!("parsed {other:?}"),
        };
        assert!(dev(&["orders-center", "dev"]).migrate);
        assert!(!dev(&["orders-center", "dev", "--migrate=false"]).migrate);
        let api =
            Config::try_parse_from(["orders-center", "api", "--request-timeout", "2s"]).unwrap();
        match api.command {
            Command::Api(a) => {
                assert!(!a.migrate);
                assert_eq!(a.http.request_timeout, Duration::from_secs(2));
                assert_eq!(a.listen.port(), 8080);
            }
            other => panic!("parsed {other:?}"),
        }
    }
}

//! The orders-center binary: wires configuration, signals and the library
//! crates together. Each subcommand is one role.

mod config;
mod saga_roles;
mod tasks_cli;
mod transports;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::{Command, Config, DevArgs, LeaderElection, LogFormat, RelayArgs};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let _telemetry = telemetry::init(
        "orders-center",
        match config.log_format {
            LogFormat::Json => telemetry::LogFormat::Json,
            LogFormat::Text => telemetry::LogFormat::Text,
        },
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match run(&config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line: what failed and why.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: &Config, shutdown: CancellationToken) -> Result<()> {
    match &config.command {
        Command::Migrate => {
            let store = open_store(config, require_url(config, "migrate")?)?;
            migrate(&store).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Api(args) => {
            let store = open_store(config, require_url(config, "api")?)?;
            if args.migrate {
                migrate(&store).await?;
            }
            let listener = bind(args.listen).await?;
            tracing::info!(url = %url_of(&listener)?, "api listening");
            serve_api(
                store,
                listener,
                config::api_config(&args.http, &args.auth),
                args.cache.cache_config(),
                shutdown,
            )
            .await
        }
        Command::Relay(args) => run_relay(config, args, shutdown).await,
        Command::Tasks(command) => {
            let store = open_store(config, require_url(config, "tasks")?)?;
            tasks_cli::run(&store, command).await
        }
        Command::Consume(args) => consume(config, args, shutdown).await,
        Command::Ingest(args) => ingest(config, args, shutdown).await,
        Command::Dev(args) => dev(config, args, shutdown).await,
        Command::Inventory(args) => {
            saga_roles::run_service(config, saga_roles::Service::Inventory, args, shutdown).await
        }
        Command::Payments(args) => {
            saga_roles::run_service(config, saga_roles::Service::Payments, args, shutdown).await
        }
        Command::Notifier(args) => saga_roles::run_notifier(config, args, shutdown).await,
        Command::Crdgen => {
            print!("{}", relay_resource::crd_yaml());
            Ok(())
        }
    }
}

/// `consume`: one consumer of the orders database over `--broker`.
async fn consume(
    config: &Config,
    args: &config::ConsumeArgs,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = open_store(config, require_url(config, "consume")?)?;
    let (name, streams, consumer): (_, _, Box<dyn inbox::Consumer>) = match args.consumer {
        config::ConsumerName::Journal => (
            transports::JOURNAL,
            transports::Stream::orders(),
            Box::new(transports::journal_inbox(&store)),
        ),
        config::ConsumerName::Saga => (
            orchestrator::CONSUMER,
            transports::Stream::saga(orchestrator::CONSUMER, &orchestrator::TOPICS),
            Box::new(transports::saga_inbox(&store, &config.keys())),
        ),
    };
    if args.consumer == config::ConsumerName::Saga {
        orchestrator::SagaMetrics::get();
        transports::warn_unsigned(&config.keys(), &orchestrator::TOPICS);
    }
    run_consumer(
        config, &args.run, store, name, &streams, &*consumer, shutdown,
    )
    .await
}

/// `ingest`: whole orders from `--broker`, saved as `PUT` saves them.
async fn ingest(
    config: &Config,
    args: &config::IngestArgs,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = open_store(config, require_url(config, "ingest")?)?;
    let consumer = transports::ingest_inbox(&store, args.run.transactions);
    let streams = transports::Stream::ingest(&args.source);
    run_consumer(
        config,
        &args.run,
        store,
        ingest::CONSUMER,
        &streams,
        &consumer,
        shutdown,
    )
    .await
}

/// Runs `consumer` over `--broker` with its status endpoints. The process
/// ends with the consumer: an error there is the exit status.
async fn run_consumer(
    config: &Config,
    flags: &config::ConsumerFlags,
    store: store::Store,
    name: &str,
    streams: &[transports::Stream],
    consumer: &dyn inbox::Consumer,
    shutdown: CancellationToken,
) -> Result<()> {
    let transport = transports::Transport::required(config, name)?;
    let broker = config.broker.as_ref().expect("a transport has a broker");
    let listener = bind(flags.listen).await?;
    transport.prepare(name, streams).await?;
    tracing::info!(url = %url_of(&listener)?, %broker, consumer = name, "consumer started");
    let status = serve(
        listener,
        stall_gate(consumer_status(Some(store)), config.consumer_stall_after),
        flags.http.limits(),
        &shutdown,
    );
    let feed = transports::Feed {
        batch: flags.batch,
        members: flags.members,
    };
    let result = transport
        .run(consumer, streams, feed, shutdown.clone())
        .await;
    // Whatever ended the consumer ends the process.
    shutdown.cancel();
    status
        .await?
        .context("serving the consumer status endpoints")?;
    result?;
    tracing::info!("consumer stopped");
    Ok(())
}

/// Answers /readyz with 503, naming them, while a consumer of this process
/// has messages waiting and has settled nothing for `after`; otherwise
/// leaves /readyz to `router`.
fn stall_gate(router: axum::Router, after: std::time::Duration) -> axum::Router {
    use axum::response::IntoResponse;
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            if req.uri().path() == "/readyz" {
                let stalled = transports::consumer_metrics().stalled(after);
                if !stalled.is_empty() {
                    let status = serde_json::json!({
                        "status": format!(
                            "no progress for {} with messages waiting",
                            humantime::format_duration(after)
                        ),
                        "stalled": stalled,
                    });
                    return (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(status),
                    )
                        .into_response();
                }
            }
            next.run(req).await
        },
    ))
}

/// /metrics (the default registry), /healthz and /readyz of a consumer;
/// ready while `store` answers (always, without one).
fn consumer_status(store: Option<store::Store>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let store = store.clone();
                async move {
                    match store {
                        Some(store) if store.ping().await.is_err() => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "database unavailable",
                        ),
                        _ => (axum::http::StatusCode::OK, "ready"),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                let mut buf = String::new();
                prometheus::TextEncoder::new()
                    .encode_utf8(&prometheus::gather(), &mut buf)
                    .expect("text encoding cannot fail");
                buf
            }),
        )
}

async fn run_relay(config: &Config, args: &RelayArgs, shutdown: CancellationToken) -> Result<()> {
    let store = open_store(config, require_url(config, "relay")?)?;
    let onec = args
        .tuning
        .onec_config(&args.onec_url, &args.onec_username, &args.onec_password);
    let relay_config = args.tuning.relay_config();
    let relay_id = relay_config.service.relay_id.clone();
    let outlets = transports::outlets(
        config,
        &args.tuning,
        &store,
        || Ok(onec::HttpOnecClient::new(&onec)?),
        None,
    )
    .await?;
    let listener = bind(args.listen).await?;
    tracing::info!(
        url = %url_of(&listener)?,
        relay_id = %relay_id,
        onec = %args.onec_url,
        "relay started"
    );
    let leadership = leadership(&args.election, &store, &relay_id, &shutdown).await?;
    let relay = relay::Relay::start(
        store.clone(),
        outlets,
        relay_config,
        leadership,
        shutdown.clone(),
    );
    if config.saga().route.is_some() {
        orchestrator::SagaMetrics::get();
        relay.schedule(orchestrator::deadline_job(
            store,
            args.tuning.saga_deadline_interval,
        ));
    }
    if args.resources.outbox_relay_resources {
        let client = kube_client().await?;
        let namespace = args
            .resources
            .outbox_relay_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        tracing::info!(%namespace, selector = ?args.resources.outbox_relay_selector, "steered by OutboxRelay resources");
        relay_resource::steer(
            &relay,
            client,
            &namespace,
            args.resources.outbox_relay_selector.clone(),
            &relay_id,
        );
    }
    let status = serve_status(listener, &relay, args.http.limits(), &shutdown);
    relay.stopped().await?;
    status
        .await?
        .context("serving the relay status endpoints")?;
    tracing::info!("relay stopped");
    Ok(())
}

/// The leader election `args` ask for, running until `shutdown`.
async fn leadership(
    args: &config::ElectionArgs,
    store: &store::Store,
    identity: &str,
    shutdown: &CancellationToken,
) -> Result<relay::Leadership> {
    let election = args.election_config().map_err(anyhow::Error::msg)?;
    let lock: Arc<dyn worker::LeaseLock> = match args.leader_election {
        LeaderElection::None => return Ok(relay::Leadership::always()),
        LeaderElection::Postgres => Arc::new(worker::PgLease::new(
            store.clone(),
            &args.lease_name,
            identity,
            election.lease_duration,
            shutdown.clone(),
        )),
        LeaderElection::Kube => {
            let client = kube_client().await?;
            let namespace = args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            Arc::new(worker::KubeLease::new(
                client,
                &namespace,
                &args.lease_name,
                identity,
                election.lease_duration,
            ))
        }
    };
    tracing::info!(backend = ?args.leader_election, lease = %args.lease_name, identity, "electing a leader");
    let (elector, task) = worker::Elector::start(lock, election, shutdown.clone());
    Ok(relay::Leadership {
        leader: elector,
        election: Some(task),
    })
}

async fn kube_client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")
}

/// `dev`: a throwaway PostgreSQL unless `DATABASE_URL` is set, then the API,
/// a relay and the 1C mock in one process.
async fn dev(config: &Config, args: &DevArgs, shutdown: CancellationToken) -> Result<()> {
    let (url, throwaway) = match &config.database_url {
        Some(url) => (url.clone(), None),
        None => {
            let pg = tokio::task::spawn_blocking(|| {
                ephemeral_pg::EphemeralPostgres::start(&ephemeral_pg::Options::default())
            })
            .await?
            .context("starting a throwaway PostgreSQL (set DATABASE_URL to use your own)")?;
            (pg.url(), Some(pg))
        }
    };
    let store = open_store(config, &url)?;
    if args.migrate {
        migrate(&store).await?;
    }

    let api_listener = bind(args.listen).await?;
    let relay_listener = bind(args.relay_listen).await?;
    let mock_listener = bind(args.onec_mock_listen).await?;
    let saga_listeners = saga_roles::DevListeners {
        inventory: bind(args.inventory_listen).await?,
        payments: bind(args.payments_listen).await?,
        notifier: bind(args.notifier_listen).await?,
    };
    let mut service_urls = Vec::new();
    for service in [
        saga_roles::Service::Inventory,
        saga_roles::Service::Payments,
    ] {
        let url = match service.database_url(config) {
            Some(url) => url.to_owned(),
            None => beside(&url, service.name()).await?,
        };
        service_urls.push((service, url));
    }
    let service_urls: [_; 2] = service_urls.try_into().expect("two services");
    let saga = saga_roles::DevSaga::start(
        config,
        &args.relay,
        &store,
        service_urls,
        saga_listeners,
        args.webhook.webhook(),
        args.http.limits(),
        args.auth.config(),
        args.migrate,
        &shutdown,
    )
    .await?;
    let (api_url, relay_url, mock_url) = (
        url_of(&api_listener)?,
        url_of(&relay_listener)?,
        url_of(&mock_listener)?,
    );

    // The mock outlives the relay, so deliveries in flight at shutdown finish.
    let mock_shutdown = CancellationToken::new();
    let (user, password) = ("orders-center", uuid::Uuid::new_v4().simple().to_string());
    let (_, mock_server) = onec_mock::spawn(
        mock_listener,
        onec_mock::MockConfig {
            username: user.into(),
            password: password.clone(),
            faults: onec_mock::Faults::default(),
        },
        mock_shutdown.clone().cancelled_owned(),
    )
    .map_err(anyhow::Error::msg)?;
    let onec = args.relay.onec_config(&mock_url, user, &password);
    let outlets = transports::outlets(
        config,
        &args.relay,
        &store,
        || Ok(onec::HttpOnecClient::new(&onec)?),
        saga.peers.as_ref(),
    )
    .await?;
    // With a broker the journal reads it; without one the relay feeds the
    // journal from the outbox (one of the outlets above).
    let transport = transports::Transport::of(config);
    if let Some(t) = &transport {
        t.prepare(transports::JOURNAL, &transports::Stream::orders())
            .await?;
    }
    // With a broker, dev also ingests whole orders from it.
    if let Some(t) = &transport {
        t.prepare(
            ingest::CONSUMER,
            &transports::Stream::ingest(ingest::DEFAULT_SOURCE),
        )
        .await?;
    }
    let ingestion = transport.clone().map(|transport| {
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let streams = transports::Stream::ingest(ingest::DEFAULT_SOURCE);
            let result = transport
                .run(
                    &transports::ingest_inbox(&store, ingest::DEFAULT_TRANSACTIONS),
                    &streams,
                    transports::Feed::batch(500),
                    shutdown.clone(),
                )
                .await;
            shutdown.cancel();
            result
        })
    });
    let journal = transport.map(|transport| {
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let result = transports::run_journal(transport, store, 500, shutdown.clone()).await;
            // A consumer that dies stops dev, as any role would.
            shutdown.cancel();
            result
        })
    });
    let relay = relay::Relay::start(
        store.clone(),
        outlets,
        args.relay.relay_config(),
        relay::Leadership::always(),
        shutdown.clone(),
    );
    orchestrator::SagaMetrics::get();
    relay.schedule(orchestrator::deadline_job(
        store.clone(),
        args.relay.saga_deadline_interval,
    ));
    let relay_status = serve_status(relay_listener, &relay, args.http.limits(), &shutdown);

    let services: Vec<String> = saga.urls.iter().map(|(s, u)| format!("{s}={u}")).collect();
    tracing::info!(url = %api_url, services = services.join(" "), "dev listening");
    println!("orders-center dev is running");
    println!("  API           {api_url}/api/v1/orders");
    println!("  Swagger UI    {api_url}/docs");
    println!("  OpenAPI       {api_url}/openapi.json");
    println!("  Health        {api_url}/healthz");
    println!("  Metrics       {api_url}/metrics  (relay: {relay_url}/metrics)");
    println!("  1C mock       {mock_url}/stats  (orders: {mock_url}/admin/orders)");
    for (service, url) in &saga.urls {
        println!("  {service:<13} {url}  (API docs: {url}/docs)");
    }
    match &config.broker {
        Some(broker) => {
            println!("  Events        to {broker}, read by the journal consumer");
            println!(
                "  Ingestion     whole orders from {broker}, {}",
                ingest::DEFAULT_SOURCE
            );
        }
        None => {
            println!("  Events        to the journal consumer, fed from the outbox (order_journal)")
        }
    }
    match &throwaway {
        Some(pg) => println!(
            "  PostgreSQL    {url}  (throwaway in {}, removed on exit)",
            pg.dir().display()
        ),
        None => println!("  PostgreSQL    from DATABASE_URL"),
    }
    println!("Press Ctrl-C to stop.");

    let pool = store.pool().clone();
    serve_api(
        store,
        api_listener,
        config::api_config(&args.http, &args.auth),
        args.cache.cache_config(),
        shutdown,
    )
    .await?;
    relay.stopped().await?;
    relay_status
        .await?
        .context("serving the relay status endpoints")?;
    if let Some(journal) = journal {
        journal.await?.context("the journal consumer")?;
    }
    if let Some(ingestion) = ingestion {
        ingestion.await?.context("ingestion")?;
    }
    saga.stopped().await.context("the saga's services")?;
    mock_shutdown.cancel();
    mock_server.await?.context("serving the 1C mock")?;
    pool.close().await;
    if let Some(pg) = throwaway {
        tokio::task::spawn_blocking(move || pg.stop())
            .await?
            .context("stopping the throwaway PostgreSQL")?;
    }
    println!("orders-center dev stopped");
    Ok(())
}

async fn serve_api(
    store: store::Store,
    listener: TcpListener,
    config: api::ApiConfig,
    cache: Option<order_cache::CacheConfig>,
    shutdown: CancellationToken,
) -> Result<()> {
    if !config.auth.enabled() {
        tracing::warn!("no API_TOKENS configured: anyone who reaches the API can write");
    }
    let limits = config.limits.clone();
    let mut state = api::AppState::new(store.clone(), config);
    // The listener reconnects by itself and returns only when cancelled.
    let listening = cache.map(|cache| {
        state = state.clone().with_cache(cache);
        let cache = state.cache.clone().expect("just set");
        tokio::spawn(order_cache::listener::run(cache, store, shutdown.clone()))
    });
    let app = api::router(state);
    let served = http_server::serve(listener, app, &limits, shutdown.clone().cancelled_owned())
        .await
        .context("serving the API");
    shutdown.cancel();
    if let Some(listening) = listening {
        listening.await.context("the order cache's listener")?;
    }
    served
}

/// Serves the relay's status endpoints in the background until `shutdown`.
fn serve_status(
    listener: TcpListener,
    relay: &relay::Relay,
    limits: http_server::Limits,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    serve(listener, relay.status_router(), limits, shutdown)
}

/// Serves `router` in the background until `shutdown`.
fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: http_server::Limits,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let router = http_server::with_limits(router, &limits);
    let shutdown = shutdown.clone().cancelled_owned();
    tokio::spawn(async move { http_server::serve(listener, router, &limits, shutdown).await })
}

async fn migrate(store: &store::Store) -> Result<()> {
    store::migrate(store.pool())
        .await
        .context("applying migrations")
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// A clickable URL for a listener: `0.0.0.0` becomes `127.0.0.1`.
fn url_of(listener: &TcpListener) -> Result<String> {
    let addr = listener.local_addr()?;
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    Ok(format!("http://{addr}"))
}

fn require_url<'a>(config: &'a Config, role: &str) -> Result<&'a str> {
    config
        .database_url
        .as_deref()
        .with_context(|| format!("`{role}` needs DATABASE_URL or --database-url"))
}

fn open_store(config: &Config, url: &str) -> Result<store::Store> {
    Ok(store::Store::new(connect(config, url)?)
        .with_routes(config.routes())
        .with_saga(config.saga()))
}

/// A lazy pool on `url` of the configured size.
fn connect(config: &Config, url: &str) -> Result<sqlx::PgPool> {
    store::connect_lazy(
        url,
        &store::PoolConfig {
            max_connections: config.database_max_connections,
            ..Default::default()
        },
    )
    .context("parsing the database URL")
}

/// The URL of a database named `<database of url>_<suffix>` on the server
/// of `url`, created if it does not exist: `dev`'s service databases.
async fn beside(url: &str, suffix: &str) -> Result<String> {
    use sqlx::postgres::PgConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    let options: PgConnectOptions = url.parse().context("parsing the database URL")?;
    let base = options.get_database().unwrap_or("postgres").to_owned();
    let name = format!("{base}_{suffix}");
    let mut admin = sqlx::PgConnection::connect_with(&options)
        .await
        .context("connecting to PostgreSQL")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating the database {name}"))?;
    }
    admin.close().await.ok();
    Ok(options.database(&name).to_url_lossy().to_string())
}

/// Cancels `token` on Ctrl-C or SIGTERM. The roles receive the token; none
/// of them installs signal handlers of its own.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn readyz(router: &axum::Router) -> (axum::http::StatusCode, String) {
        use tower::ServiceExt;
        let response = router
            .clone()
            .oneshot(
                axum::http::Request::get("/readyz")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_names_a_consumer_stalled_with_messages_waiting() {
        let metrics = transports::consumer_metrics();
        metrics.start("stall-test");
        let router = stall_gate(consumer_status(None), std::time::Duration::ZERO);
        metrics.set_lag("stall-test", "q", 3);
        let (status, body) = readyz(&router).await;
        assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("stall-test"), "{body}");
        metrics.set_lag("stall-test", "q", 0);
        assert_eq!(readyz(&router).await.0, axum::http::StatusCode::OK);
        let patient = stall_gate(consumer_status(None), std::time::Duration::from_secs(60));
        metrics.set_lag("stall-test", "q", 3);
        assert_eq!(
            readyz(&patient).await.0,
            axum::http::StatusCode::OK,
            "it settled a batch less than a minute ago"
        );
    }
}

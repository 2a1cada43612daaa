//! The orders-center binary: wires configuration, signals and the library
//! crates together. Each subcommand is one role.

mod config;

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::{Command, Config, HttpArgs, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing(config.log_format);
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
            store::migrate(store.pool())
                .await
                .context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Api(args) => {
            let store = open_store(config, require_url(config, "api")?)?;
            if args.migrate {
                store::migrate(store.pool())
                    .await
                    .context("applying migrations")?;
            }
            let addr = serve_api(store, args.listen, &args.http, shutdown).await?;
            tracing::info!(%addr, "api stopped");
            Ok(())
        }
        Command::Dev(args) => dev(config, args, shutdown).await,
    }
}

/// `dev`: a throwaway PostgreSQL unless `DATABASE_URL` is set, then the API.
async fn dev(config: &Config, args: &config::DevArgs, shutdown: CancellationToken) -> Result<()> {
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
        store::migrate(store.pool())
            .await
            .context("applying migrations")?;
    }
    let listener = bind(args.listen).await?;
    let base = format!("http://{}", display_addr(listener.local_addr()?));
    println!("orders-center dev is running");
    println!("  API         {base}/api/v1/orders");
    println!("  Swagger UI  {base}/docs");
    println!("  OpenAPI     {base}/openapi.json");
    println!("  Health      {base}/healthz");
    println!("  Metrics     {base}/metrics");
    match &throwaway {
        Some(pg) => println!(
            "  PostgreSQL  {url}  (throwaway in {}, removed on exit)",
            pg.dir().display()
        ),
        None => println!("  PostgreSQL  from DATABASE_URL"),
    }
    println!("Press Ctrl-C to stop.");

    let pool = store.pool().clone();
    let app = api::router(api::AppState::new(store, args.http.api_config()));
    api::serve(listener, app, shutdown.cancelled_owned())
        .await
        .context("serving the API")?;
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
    listen: SocketAddr,
    http: &HttpArgs,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(url = %format!("http://{}", display_addr(addr)), "api listening");
    let app = api::router(api::AppState::new(store, http.api_config()));
    api::serve(listener, app, shutdown.cancelled_owned())
        .await
        .context("serving the API")?;
    Ok(addr)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// A clickable address: `0.0.0.0` becomes `127.0.0.1`.
fn display_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

fn require_url<'a>(config: &'a Config, role: &str) -> Result<&'a str> {
    config
        .database_url
        .as_deref()
        .with_context(|| format!("`{role}` needs DATABASE_URL or --database-url"))
}

fn open_store(config: &Config, url: &str) -> Result<store::Store> {
    let pool = store::connect_lazy(
        url,
        &store::PoolConfig {
            max_connections: config.database_max_connections,
            ..Default::default()
        },
    )
    .context("parsing the database URL")?;
    Ok(store::Store::new(pool))
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

//! The saga's roles: `inventory` and `payments` (each its own database, API,
//! consumer and relay), `notifier` (no database), and the same services
//! started inside `dev`.

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use saga::Topic;
use store::saga::SagaRoute;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NotifierArgs, RelayTuning, ServiceArgs};
use crate::transports::{self, Feed, LocalPeers, Stream, Transport};

/// A service of the saga with a database of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Stock and reservations.
    Inventory,
    /// Accounts and payments.
    Payments,
}

impl Service {
    /// Its name: role, consumer and database.
    pub fn name(self) -> &'static str {
        match self {
            Service::Inventory => inventory::CONSUMER,
            Service::Payments => payments::CONSUMER,
        }
    }

    /// What it consumes: its commands, and the messages of another
    /// service it acts on (inventory sells on `OrderCompleted`, payments
    /// charges on `StockReserved`).
    fn reads(self) -> [Topic; 2] {
        match self {
            Service::Inventory => [Topic::ReserveCommands, Topic::Saga],
            Service::Payments => [Topic::PaymentCommands, Topic::Reserve],
        }
    }

    /// What it answers on.
    fn answers(self) -> Topic {
        match self {
            Service::Inventory => Topic::Reserve,
            Service::Payments => Topic::Payment,
        }
    }

    /// The streams it consumes.
    fn streams(self) -> Vec<Stream> {
        Stream::saga(self.name(), &self.reads())
    }

    /// Its database URL from the configuration.
    pub fn database_url(self, config: &Config) -> Option<&str> {
        match self {
            Service::Inventory => config.inventory_database_url.as_deref(),
            Service::Payments => config.payments_database_url.as_deref(),
        }
    }

    /// Brings its database up to date.
    pub async fn migrate(self, pool: &sqlx::PgPool) -> Result<()> {
        match self {
            Service::Inventory => inventory::migrate(pool).await,
            Service::Payments => payments::migrate(pool).await,
        }
        .with_context(|| format!("applying {}'s migrations", self.name()))
    }

    /// Its HTTP API, behind `auth`.
    pub fn router(self, pool: sqlx::PgPool, auth: api::AuthConfig) -> Router {
        let routes = match self {
            Service::Inventory => inventory::http::router(pool),
            Service::Payments => payments::http::router(pool),
        };
        api::protect(routes, auth)
    }

    /// Its inbox consumer, answering along `route`.
    fn consumer(
        self,
        pool: &sqlx::PgPool,
        route: SagaRoute,
        keys: &sink::signing::Keyring,
    ) -> Box<dyn inbox::Consumer> {
        match self {
            Service::Inventory => Box::new(transports::inventory_inbox(pool, route, keys)),
            Service::Payments => Box::new(transports::payments_inbox(pool, route, keys)),
        }
    }
}

/// The store of a service database: the same outbox and relay machinery,
/// with no order routes.
pub fn service_store(config: &Config, url: &str) -> Result<store::Store> {
    Ok(store::Store::new(crate::connect(config, url)?).with_routes(domain::Routes::none()))
}

/// `inventory` or `payments`: the API and the relay's status on one port,
/// the consumer of its commands over the broker, and the relay of its
/// answers. The process ends with whichever stops first.
pub async fn run_service(
    config: &Config,
    service: Service,
    args: &ServiceArgs,
    shutdown: CancellationToken,
) -> Result<()> {
    let name = service.name();
    let url = service.database_url(config).with_context(|| {
        format!(
            "`{name}` needs its own database: {}_DATABASE_URL or --{name}-database-url",
            name.to_uppercase()
        )
    })?;
    let transport = Transport::required(config, name)?;
    let route = config.saga_route().expect("a broker gives a saga route");
    let store = service_store(config, url)?;
    if args.migrate {
        service.migrate(store.pool()).await?;
    }
    let streams = service.streams();
    transports::warn_unsigned(&config.keys(), &service.reads());
    transport.prepare(name, &streams).await?;
    let relay_config = args.tuning.relay_config();
    let outlets =
        transports::service_outlets(config, &args.tuning, &store, service.answers(), None).await?;
    let leadership = crate::leadership(
        &args.election,
        &store,
        &relay_config.service.relay_id,
        &shutdown,
    )
    .await?;
    let listener = crate::bind(args.listen).await?;
    tracing::info!(url = %crate::url_of(&listener)?, service = name, "service started");
    let relay = relay::Relay::start(
        store.clone(),
        outlets,
        relay_config,
        leadership,
        shutdown.clone(),
    );
    let router = crate::stall_gate(
        service
            .router(store.pool().clone(), args.auth.config())
            .merge(relay.status_router()),
        config.consumer_stall_after,
    );
    let server = crate::serve(listener, router, args.http.limits(), &shutdown);
    let consumer = service.consumer(store.pool(), route, &config.keys());
    let feed = transports::Feed {
        batch: args.batch,
        members: args.members,
    };
    let consumed = transport
        .run(&*consumer, &streams, feed, shutdown.clone())
        .await;
    // Whatever ended the consumer ends the process.
    shutdown.cancel();
    relay.stopped().await?;
    server.await?.context("serving the API")?;
    consumed?;
    tracing::info!(service = name, "service stopped");
    Ok(())
}

/// `notifier`: the consumer of the saga's outcomes over the broker, with
/// its notifications, /metrics, /healthz and /readyz on one port.
pub async fn run_notifier(
    config: &Config,
    args: &NotifierArgs,
    shutdown: CancellationToken,
) -> Result<()> {
    let transport = Transport::required(config, notifier::CONSUMER)?;
    let notifier = Arc::new(
        notifier::Notifier::new(args.webhook.webhook(), transports::consumer_metrics())
            .context("building the webhook client")?
            .with_keys(config.keys()),
    );
    let streams = Stream::saga(notifier::CONSUMER, &[Topic::Saga]);
    transports::warn_unsigned(&config.keys(), &[Topic::Saga]);
    transport.prepare(notifier::CONSUMER, &streams).await?;
    let listener = crate::bind(args.listen).await?;
    tracing::info!(url = %crate::url_of(&listener)?, "notifier started");
    let router = crate::stall_gate(
        api::protect(notifier.router(), args.auth.config()).merge(crate::consumer_status(None)),
        config.consumer_stall_after,
    );
    let server = crate::serve(listener, router, args.http.limits(), &shutdown);
    let consumed = transport
        .run(
            &notifier,
            &streams,
            Feed::batch(args.batch),
            shutdown.clone(),
        )
        .await;
    shutdown.cancel();
    server.await?.context("serving the notifier")?;
    consumed?;
    tracing::info!("notifier stopped");
    Ok(())
}

/// The saga's services inside `dev`.
pub struct DevSaga {
    /// inventory's and payments' relays.
    pub relays: Vec<relay::Relay>,
    /// Their APIs and the notifier's, and (over a broker) the consumers.
    pub tasks: Vec<JoinHandle<Result<()>>>,
    /// The peers the orders relay delivers to without a broker.
    pub peers: Option<LocalPeers>,
    /// Where each API listens.
    pub urls: Vec<(&'static str, String)>,
}

/// Listeners of the saga's services in `dev`.
pub struct DevListeners {
    /// inventory's API.
    pub inventory: TcpListener,
    /// payments' API.
    pub payments: TcpListener,
    /// The notifier's API.
    pub notifier: TcpListener,
}

impl DevSaga {
    /// Starts inventory and payments on their databases (`urls`), and the
    /// notifier: over the broker when there is one, otherwise fed by the
    /// relays in PostgreSQL.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &Config,
        tuning: &RelayTuning,
        orders: &store::Store,
        urls: [(Service, String); 2],
        listeners: DevListeners,
        webhook: Option<notifier::Webhook>,
        limits: http_server::Limits,
        auth: api::AuthConfig,
        migrate: bool,
        shutdown: &CancellationToken,
    ) -> Result<Self> {
        let notifier = Arc::new(
            notifier::Notifier::new(webhook, transports::consumer_metrics())
                .context("building the webhook client")?
                .with_keys(config.keys()),
        );
        let mut stores = Vec::new();
        for (service, url) in &urls {
            let store = service_store(config, url)?;
            if migrate {
                service.migrate(store.pool()).await?;
            }
            stores.push((*service, store));
        }
        let transport = Transport::of(config);
        let peers = transport.is_none().then(|| LocalPeers {
            orders: orders.clone(),
            inventory: stores[0].1.pool().clone(),
            payments: stores[1].1.pool().clone(),
            notifier: notifier.clone(),
        });
        let mut saga = DevSaga {
            relays: Vec::new(),
            tasks: Vec::new(),
            peers,
            urls: vec![
                ("inventory", crate::url_of(&listeners.inventory)?),
                ("payments", crate::url_of(&listeners.payments)?),
                ("notifier", crate::url_of(&listeners.notifier)?),
            ],
        };
        let mut service_listeners = vec![listeners.inventory, listeners.payments].into_iter();
        for (service, store) in stores {
            let outlets = transports::service_outlets(
                config,
                tuning,
                &store,
                service.answers(),
                saga.peers.as_ref(),
            )
            .await?;
            let relay = relay::Relay::start(
                store.clone(),
                outlets,
                tuning.relay_config(),
                relay::Leadership::always(),
                shutdown.clone(),
            );
            let router = service.router(store.pool().clone(), auth.clone());
            let listener = service_listeners.next().expect("one listener per service");
            saga.tasks.push(flatten(crate::serve(
                listener,
                router,
                limits.clone(),
                shutdown,
            )));
            if let Some(t) = &transport {
                let route = config.saga_route().expect("a broker gives a saga route");
                let streams = service.streams();
                t.prepare(service.name(), &streams).await?;
                let consumer = service.consumer(store.pool(), route, &config.keys());
                saga.tasks
                    .push(consume(t.clone(), consumer, streams, shutdown));
            }
            saga.relays.push(relay);
        }
        if let Some(t) = &transport {
            let streams = Stream::saga(orchestrator::CONSUMER, &orchestrator::TOPICS);
            t.prepare(orchestrator::CONSUMER, &streams).await?;
            let orchestrator: Box<dyn inbox::Consumer> =
                Box::new(transports::saga_inbox(orders, &config.keys()));
            saga.tasks
                .push(consume(t.clone(), orchestrator, streams, shutdown));
            let streams = Stream::saga(notifier::CONSUMER, &[Topic::Saga]);
            t.prepare(notifier::CONSUMER, &streams).await?;
            saga.tasks.push(consume(
                t.clone(),
                Box::new(notifier.clone()),
                streams,
                shutdown,
            ));
        }
        saga.tasks.push(flatten(crate::serve(
            listeners.notifier,
            api::protect(notifier.router(), auth),
            limits,
            shutdown,
        )));
        Ok(saga)
    }

    /// Waits for everything to stop.
    pub async fn stopped(self) -> Result<()> {
        for relay in self.relays {
            relay.stopped().await?;
        }
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

fn flatten(server: JoinHandle<std::io::Result<()>>) -> JoinHandle<Result<()>> {
    tokio::spawn(async move { Ok(server.await??) })
}

/// Runs `consumer` over `transport`; its end (or death) stops `dev`.
fn consume(
    transport: Transport,
    consumer: Box<dyn inbox::Consumer>,
    streams: Vec<Stream>,
    shutdown: &CancellationToken,
) -> JoinHandle<Result<()>> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let result = transport
            .run(&*consumer, &streams, Feed::batch(100), shutdown.clone())
            .await;
        shutdown.cancel();
        result
    })
}

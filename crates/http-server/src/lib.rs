//! How every orders-center listener serves HTTP (the API, the relay's status
//! endpoints and the 1C mock), so none of them can be held open by a slow or
//! oversized client:
//!
//! - request headers must arrive within [`Limits::header_timeout`], so a
//!   slowloris client trickling header bytes is disconnected (hyper enforces
//!   this only with a timer, which `axum::serve` does not set);
//! - a request, body included, must be answered within
//!   [`Limits::request_timeout`] (408);
//! - bodies above [`Limits::body_limit`] are refused (413);
//! - at most [`Limits::max_connections`] connections are served at once;
//!   further clients wait in the listen backlog.
//!
//! Only HTTP/1.1 is served. Nothing here needs HTTP/2 (clients send one
//! JSON request at a time, and ingresses and load balancers talk HTTP/1.1 to
//! pods), and hyper's HTTP/2 server has no idle timeout: cleartext HTTP/2
//! connections that only answered pings stayed open forever.
//!
//! Shutdown is passed in: when it completes, the listener stops accepting,
//! requests in flight finish, and idle keep-alive connections are closed.

use std::future::Future;
use std::io;
use std::time::Duration;

use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::{Method, StatusCode};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutLayer;

/// Limits of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Longest a request may take, body included, before it is answered 408.
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers; also how long
    /// an idle keep-alive connection is kept.
    pub header_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

/// Adds the body limit and the request timeout to `router`. Routers that
/// render errors their own way (the API's problem+json) put these layers
/// inside that rendering instead.
pub fn with_limits<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    limits: &Limits,
) -> Router<S> {
    router
        .layer(DefaultBodyLimit::max(limits.body_limit))
        .layer(request_timeout(limits))
}

/// A metric label for `method` from a bounded set: the server accepts any
/// token as a method, and each new label value would be a new series kept
/// forever.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// 408 rather than 503: the usual cause is a client sending its body slowly.
pub fn request_timeout(limits: &Limits) -> TimeoutLayer {
    TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout)
}

/// How long shutdown waits for requests in flight before closing anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `shutdown` completes, then finishes
/// the requests in flight (for at most 30 s more).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting: the kernel's backlog holds the rest.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Out of file descriptors and the like: back off, keep serving.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (builder, router, watcher) = (builder.clone(), router.clone(), graceful.watcher());
        let first_byte = limits.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            // hyper's header timer starts at the first byte: a client that
            // connects and stays silent would hold its socket forever. So
            // the first byte must come within the header timeout.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            // Handlers may read the peer as axum's `ConnectInfo<SocketAddr>`.
            let router = tower::Layer::layer(&axum::Extension(ConnectInfo(peer)), router);
            let service = TowerToHyperService::new(router);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN_GRACE:?}; closing anyway");
    }
    Ok(())
}

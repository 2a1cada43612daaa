//! How every orders-center listener serves HTTP (the API, the relay's status
//! endpoints and the 1C mock), so none of them can be held open by a slow or
//! oversized client:
//!
//! - request headers must arrive within [`Limits::header_timeout`], so a
//!   slowloris client trickling header bytes is disconnected (hyper enforces
//!   this only with a timer, which `axum::serve` does not set);
//! - a request, body included, must be answered within
//!   [`Limits::request_timeout`] (408);
//! - bodies above [`Limits::body_limit`] are refused (413).
//!
//! Shutdown is passed in: when it completes, the listener stops accepting,
//! requests in flight finish, and idle keep-alive connections are closed.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
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
            // hyper's header timer starts at the first byte, and telling
            // HTTP/1 from HTTP/2 waits for bytes with no timer at all: a
            // client that connects and stays silent would hold its socket
            // forever. So the first byte must come within the header timeout.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let service = TowerToHyperService::new(router);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
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

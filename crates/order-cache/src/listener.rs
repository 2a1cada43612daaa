//! The cache's listener: applies the `order_changed` notification of every
//! committed order write, and drops the whole cache when its connection is
//! lost (what was announced meanwhile is gone). [`run`] keeps one listening
//! for the life of the process; [`Listener::step`] lets a test drive it one
//! notification at a time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::OrderCache;

/// Why the listener stopped listening.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database connection failed or was closed.
    #[error("the cache listener's connection: {0}")]
    Connection(#[from] sqlx::Error),
    /// The connection closed without an error.
    #[error("the cache listener's connection was closed")]
    Closed,
}

/// One listening connection, feeding one cache.
pub struct Listener {
    cache: OrderCache,
    inner: PgListener,
}

impl Listener {
    /// Listens on a connection of its own to the database of `pool`; from
    /// the moment this returns, the cache may serve and keep entries.
    pub async fn connect(cache: &OrderCache, pool: &sqlx::PgPool) -> Result<Self, Error> {
        let mut inner = PgListener::connect_with(pool).await?;
        inner.listen(store::ORDER_CHANGED_CHANNEL).await?;
        cache.listening();
        Ok(Self {
            cache: cache.clone(),
            inner,
        })
    }

    /// Waits for the next notification and applies it. On `Err` the
    /// connection is gone and the cache has been dropped; connect anew.
    pub async fn step(&mut self) -> Result<(), Error> {
        let received = match self.inner.try_recv().await {
            Ok(Some(n)) => n,
            Ok(None) => {
                self.cache.lost();
                return Err(Error::Closed);
            }
            Err(e) => {
                self.cache.lost();
                return Err(e.into());
            }
        };
        match parse(received.payload()) {
            Some((version, committed_us, id)) => {
                self.cache.notified(id, version, since(committed_us));
            }
            None => tracing::warn!(
                payload = received.payload(),
                "an order_changed notification that is not `<version> <µs> <id>`; ignored"
            ),
        }
        Ok(())
    }
}

/// `<version> <commit time in µs since the epoch> <order id>`.
fn parse(payload: &str) -> Option<(i64, i64, &str)> {
    let mut parts = payload.splitn(3, ' ');
    let version = parts.next()?.parse().ok()?;
    let committed = parts.next()?.parse().ok()?;
    let id = parts.next().filter(|id| !id.is_empty())?;
    Some((version, committed, id))
}

/// From `committed_us` to now; zero if the clocks disagree the other way.
fn since(committed_us: i64) -> Duration {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    Duration::from_micros(u64::try_from(now_us.saturating_sub(committed_us)).unwrap_or(0))
}

/// How long a lost listener waits before connecting again.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Keeps `cache` listening until `cancel`, reconnecting after every loss,
/// and warms it from `store` the first time it listens. It returns only
/// when cancelled: a database that is away is waited for, not fatal.
pub async fn run(cache: OrderCache, store: store::Store, cancel: CancellationToken) {
    let limit = cache.config().warmup_limit;
    let deadline = {
        let cache = cache.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(limit) => {
                    if !cache.is_ready() {
                        tracing::warn!(?limit, "the cache warm-up passed its limit; ready anyway");
                        cache.mark_ready();
                    }
                }
            }
        })
    };
    let mut warmed = false;
    loop {
        match Listener::connect(&cache, store.pool()).await {
            Ok(mut listener) => {
                tracing::info!("the order cache listens for order changes");
                if !warmed {
                    warmed = true;
                    let (cache, store) = (cache.clone(), store.clone());
                    tokio::spawn(async move { crate::warm::run(&cache, &store).await });
                }
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            deadline.abort();
                            return;
                        }
                        stepped = listener.step() => if let Err(e) = stepped {
                            tracing::warn!(error = %e, "the order cache stopped listening and was dropped; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the order cache cannot listen yet; serving from the database")
            }
        }
        tokio::select! {
            () = cancel.cancelled() => {
                deadline.abort();
                return;
            }
            () = tokio::time::sleep(RECONNECT_DELAY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_bad_ones_do_not() {
        assert_eq!(
            parse("3 1700000000000000 A-1"),
            Some((3, 1_700_000_000_000_000, "A-1"))
        );
        for bad in ["", "3", "3 x A", "x 1 A", "3 1 ", "3 1"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(since(i64::MAX), Duration::ZERO);
        assert!(since(0) > Duration::from_secs(1_000_000));
    }
}

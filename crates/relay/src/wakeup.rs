//! Wakes the deliver job when a save commits: `LISTEN` on the channel the
//! saving transaction notifies. The cron's poll interval is the fallback, so
//! a lost notification delays a task by at most that long.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Wakes the deliver job on every committed save, until `cancel` fires.
pub async fn listen_for_saves(pool: PgPool, wake: Arc<Notify>, cancel: CancellationToken) {
    listen(pool, store::NOTIFY_CHANNEL, wake, cancel).await;
}

/// Notifies `wake` for every notification on `channel` until `cancel`
/// fires, reconnecting with backoff. Every (re)connection also wakes once,
/// to catch up on notifications sent while nobody listened.
pub async fn listen(
    pool: PgPool,
    channel: &'static str,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut retry = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match subscribe(&pool, channel).await {
            Ok(mut listener) => {
                retry = Duration::from_millis(100);
                wake.notify_one();
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        received = listener.try_recv() => match received {
                            // `None`: the connection dropped and was restored.
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(channel, error = %e, "LISTEN connection failed; polling until it is back");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(channel, error = %e, "cannot LISTEN; polling until it works"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

async fn subscribe(pool: &PgPool, channel: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

//! Wakes jobs when a transaction commits: `LISTEN` on the channel it
//! notifies. The cron's poll interval is the fallback, so a lost
//! notification delays work by at most that long.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Notifies each of `wake` for every notification on `channel` until
/// `cancel` fires, reconnecting with backoff. Every (re)connection also wakes
/// once, to catch up on notifications sent while nobody listened.
pub async fn listen(
    pool: PgPool,
    channel: &'static str,
    wake: Vec<Arc<Notify>>,
    cancel: CancellationToken,
) {
    let wake_all = || wake.iter().for_each(|w| w.notify_one());
    let mut retry = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match subscribe(&pool, channel).await {
            Ok(mut listener) => {
                retry = Duration::from_millis(100);
                wake_all();
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        received = listener.try_recv() => match received {
                            // `None`: the connection dropped and was restored.
                            Ok(_) => wake_all(),
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

//! The notifier (seed 004): the consumer of the saga's outcomes
//! (`OrderCompleted`, `OrderCancelled` with its reason). It has no
//! database: it keeps the notifications it made in memory, logs each one,
//! serves them at `/api/v1/notifications`, and, when a webhook is set,
//! POSTs each one there before the message is acknowledged, so a crash
//! loses none (the broker redelivers) and the `Idempotency-Key` header (the
//! order id) lets the receiver drop the repeat.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::extract::{PathId, QueryParams};
use api::{ApiError, RouterWideAnswers};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use domain::Money;
use inbox::{Consumer, ConsumerMetrics, DeadLetter, Error, Incoming, Verdict};
use saga::{Kind, Topic};
use serde::{Deserialize, Serialize};
use sink::signing::Keyring;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

/// The consumer name.
pub const CONSUMER: &str = "notifier";

/// The notifications kept for inspection and deduplication.
pub const KEPT: usize = 100_000;

/// One notification: the outcome of one order's saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Notification {
    /// The order.
    pub order_id: String,
    /// `completed` or `cancelled`.
    pub outcome: String,
    /// What was charged, for a completed order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<Money>,
    /// Why, for a cancelled order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The id of the message it came from.
    pub message_id: String,
    /// When it was made.
    pub at: DateTime<Utc>,
}

/// Where notifications are POSTed.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The URL.
    pub url: String,
    /// Attempts per notification before the batch is handed back to the
    /// transport (which redelivers it later).
    pub attempts: u32,
    /// Each attempt's timeout.
    pub timeout: Duration,
}

#[derive(Default)]
struct Log {
    by_order: BTreeMap<String, Notification>,
    order: VecDeque<String>,
}

/// The notifier.
pub struct Notifier {
    log: Mutex<Log>,
    webhook: Option<(Webhook, reqwest::Client)>,
    metrics: ConsumerMetrics,
    keys: Keyring,
}

impl Notifier {
    /// A notifier, POSTing to `webhook` if given.
    pub fn new(webhook: Option<Webhook>, metrics: ConsumerMetrics) -> Result<Self, reqwest::Error> {
        let webhook = match webhook {
            Some(w) => {
                let client = reqwest::Client::builder().timeout(w.timeout).build()?;
                Some((w, client))
            }
            None => None,
        };
        metrics.start(CONSUMER);
        Ok(Self {
            log: Mutex::default(),
            webhook,
            metrics,
            keys: Keyring::default(),
        })
    }

    /// Requires the signature of `keys` on the outcomes' topic, when it has
    /// a key there.
    pub fn with_keys(mut self, keys: Keyring) -> Self {
        self.keys = keys;
        self
    }

    /// Every notification kept, oldest first.
    pub fn notifications(&self) -> Vec<Notification> {
        self.page(None, usize::MAX).0
    }

    /// Up to `limit` notifications, oldest first, after the one about
    /// order `after` (from the first when `None`, or when it is no longer
    /// kept), and whether more follow.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Notification>, bool) {
        let log = self.log.lock().expect("the log lock is never poisoned");
        let start = after
            .and_then(|a| log.order.iter().position(|id| id == a))
            .map_or(0, |i| i + 1);
        let mut rest = log
            .order
            .iter()
            .skip(start)
            .filter_map(|id| log.by_order.get(id));
        let page: Vec<Notification> = rest.by_ref().take(limit).cloned().collect();
        (page, rest.next().is_some())
    }

    /// The notification about `order`, if one was made.
    pub fn notification(&self, order: &str) -> Option<Notification> {
        let log = self.log.lock().expect("the log lock is never poisoned");
        log.by_order.get(order).cloned()
    }

    fn known(&self, order: &str) -> bool {
        let log = self.log.lock().expect("the log lock is never poisoned");
        log.by_order.contains_key(order)
    }

    fn keep(&self, n: Notification) {
        let mut log = self.log.lock().expect("the log lock is never poisoned");
        if log.by_order.contains_key(&n.order_id) {
            return;
        }
        log.order.push_back(n.order_id.clone());
        log.by_order.insert(n.order_id.clone(), n);
        while log.order.len() > KEPT {
            if let Some(old) = log.order.pop_front() {
                log.by_order.remove(&old);
            }
        }
    }

    async fn post(&self, n: &Notification) -> Result<(), Error> {
        let Some((webhook, client)) = &self.webhook else {
            return Ok(());
        };
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        for attempt in 1..=webhook.attempts.max(1) {
            let sent = client
                .post(&webhook.url)
                .header("Idempotency-Key", &n.order_id)
                .json(n)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    // The receiver will never take it: a retry cannot help.
                    tracing::error!(order = n.order_id, status = %r.status(), "the webhook refused a notification; dropped");
                    return Ok(());
                }
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = e.to_string(),
            }
            tracing::warn!(
                order = n.order_id,
                attempt,
                error = last,
                "webhook attempt failed"
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        Err(Error::Downstream(format!(
            "the webhook {}: {last}",
            webhook.url
        )))
    }

    /// The routes: every notification, and one order's.
    pub fn router(self: &std::sync::Arc<Self>) -> Router {
        api::with_problems(
            Router::new()
                .route("/api/v1/notifications", get(list))
                .route("/api/v1/notifications/{order_id}", get(one))
                .with_state(self.clone()),
        )
        .merge(SwaggerUi::new("/docs").url("/openapi.json", NotifierApi::openapi()))
    }
}

/// The notifier's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "notifier",
        description = "The outcome of each order's saga, as notified."
    ),
    paths(list, one),
    components(schemas(Notification, api::Problem)),
    modifiers(&RouterWideAnswers)
)]
pub struct NotifierApi;

/// The most notifications one page holds.
pub const MAX_PAGE: usize = 1000;

/// A page of the list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Page {
    /// Notifications per page, 1 to 1000 (100 by default).
    limit: Option<usize>,
    /// The order whose notification the page starts after: the last one of
    /// the page before (the `Link` header's `next` names it).
    after: Option<String>,
}

/// The notifications kept, oldest first, a page at a time; a `Link`
/// header with `rel="next"` names the next page while there is one.
#[utoipa::path(get, path = "/api/v1/notifications", tag = "notifications",
    params(Page),
    responses(
        (status = 200, description = "A page of notifications", body = Vec<Notification>,
         headers(("Link" = String, description = "The next page, when there is one"))),
        (status = 400, description = "A limit out of range, or a malformed order id", body = api::Problem, content_type = "application/problem+json"),
    ))]
async fn list(
    State(n): State<std::sync::Arc<Notifier>>,
    QueryParams(page): QueryParams<Page>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let limit = page.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    if let Some(after) = &page.after {
        domain::OrderId::parse(after).map_err(|m| ApiError::BadRequest(format!("after {m}")))?;
    }
    let (items, more) = n.page(page.after.as_deref(), limit);
    let next = match (more, items.last()) {
        (true, Some(last)) => Some(format!(
            "</api/v1/notifications?limit={limit}&after={}>; rel=\"next\"",
            last.order_id
        )),
        _ => None,
    };
    let mut response = Json(items).into_response();
    if let Some(next) = next {
        response.headers_mut().insert(
            axum::http::header::LINK,
            next.parse().expect("order ids are header-safe"),
        );
    }
    Ok(response)
}

/// The notification about one order.
#[utoipa::path(get, path = "/api/v1/notifications/{order_id}", tag = "notifications",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The notification", body = Notification),
        (status = 404, description = "No notification about this order", body = api::Problem, content_type = "application/problem+json"),
    ))]
async fn one(
    State(n): State<std::sync::Arc<Notifier>>,
    PathId(order): PathId<domain::OrderId>,
) -> Result<Json<Notification>, ApiError> {
    n.notification(order.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no notification about order {order}")))
}

#[async_trait::async_trait]
impl Consumer for Notifier {
    fn consumer(&self) -> &str {
        CONSUMER
    }

    fn metrics(&self) -> &ConsumerMetrics {
        &self.metrics
    }

    async fn process(&self, batch: &[Incoming]) -> Result<Vec<Verdict>, Error> {
        let started = Instant::now();
        let mut verdicts = Vec::with_capacity(batch.len());
        for incoming in batch {
            let message = match inbox::saga::decode(&[Topic::Saga], &self.keys, incoming) {
                Ok(m) => m,
                Err(poison) => {
                    verdicts.push(Verdict::Dead(poison));
                    continue;
                }
            };
            if self.known(&message.order_id) {
                verdicts.push(Verdict::Duplicate);
                continue;
            }
            let n = Notification {
                outcome: match message.kind {
                    Kind::OrderCompleted => "completed",
                    _ => "cancelled",
                }
                .into(),
                order_id: message.order_id,
                amount: message.amount,
                reason: message.reason,
                message_id: incoming.id.clone().unwrap_or_default(),
                at: Utc::now(),
            };
            self.post(&n).await?;
            tracing::info!(order = n.order_id, outcome = n.outcome, reason = n.reason, amount = ?n.amount, "notification");
            self.keep(n);
            verdicts.push(Verdict::Applied);
        }
        self.metrics.observe(CONSUMER, &verdicts, started.elapsed());
        Ok(verdicts)
    }

    /// The notifier has no database: its log is where such a letter is
    /// kept, with the place it was read to find it again in the topic.
    async fn keep_dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), Error> {
        tracing::error!(
            consumer = CONSUMER,
            origin = letter.origin,
            message_id = letter.message_id,
            poison = %letter.poison,
            refused = letter.refused,
            size = letter.payload.len(),
            "the dead-letter destination refused a message; it stays at its origin"
        );
        self.metrics.kept(CONSUMER);
        Ok(())
    }
}

//! The HTTP client for 1C, behind [`OnecClient`] so the relay can be tested
//! without a network.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};

use crate::outcome::{classify_error, classify_response};
use crate::{Delivery, Outcome};

/// Delivers order versions to 1C.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait OnecClient: Send + Sync {
    /// Sends one order version and classifies the answer. Never panics and
    /// never returns early without an [`Outcome`].
    async fn put_order(&self, delivery: &Delivery) -> Outcome;
}

/// Basic-auth credentials. `Debug` hides the password, so it can never end
/// up in a log line or an error.
#[derive(Clone, Default)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to reach 1C.
#[derive(Debug, Clone)]
pub struct OnecConfig {
    /// Base URL, e.g. `http://onec-mock:8081`.
    pub base_url: String,
    /// Basic-auth credentials.
    pub credentials: Credentials,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Idle keep-alive connections kept per host.
    pub max_idle_connections: usize,
}

/// The reqwest implementation: pooled keep-alive connections, a request
/// timeout, and no redirects (so credentials never leave for another host).
#[derive(Debug, Clone)]
pub struct HttpOnecClient {
    http: reqwest::Client,
    base_url: String,
    credentials: Credentials,
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the 1C HTTP client")]
pub struct BuildError(#[source] reqwest::Error);

impl HttpOnecClient {
    /// Builds the client.
    pub fn new(config: &OnecConfig) -> Result<Self, BuildError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(config.max_idle_connections)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()
            .map_err(BuildError)?;
        Ok(Self {
            http,
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            credentials: config.credentials.clone(),
        })
    }

    fn url(&self, order_id: &str) -> String {
        format!("{}/hs/orders/v1/orders/{order_id}", self.base_url)
    }
}

#[async_trait]
impl OnecClient for HttpOnecClient {
    async fn put_order(&self, d: &Delivery) -> Outcome {
        let Some(body) = d.body() else {
            return Outcome::Failed(crate::Failure {
                class: crate::ErrorClass::Rejected,
                retry_after: None,
                detail: "the snapshot is not a JSON object".into(),
            });
        };
        let mut req = self
            .http
            .put(self.url(&d.order_id))
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", d.idempotency_key())
            .body(body);
        if let Some(tp) = &d.traceparent {
            req = req.header("traceparent", tp);
        }
        let res = match req.send().await {
            Ok(res) => res,
            Err(e) => return classify_error(e),
        };
        let status = res.status();
        let retry_after = res
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match res.text().await {
            Ok(body) => classify_response(status, retry_after.as_deref(), &body),
            // The status arrived but the body did not: on success 1C has it.
            Err(_) if status.is_success() => Outcome::Delivered(crate::Applied::Applied),
            Err(e) => classify_error(e),
        }
    }
}

//! Bearer-token access control. With no token configured everything is open
//! (development); with tokens, writes and the sync admin endpoints need one,
//! and reads need one when so configured. Probes, metrics and the API docs
//! stay open, so the platform can always reach them.

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who may call what.
#[derive(Clone, Default)]
pub struct AuthConfig {
    // Digests, so every comparison is over 32 bytes whatever the lengths.
    tokens: Vec<[u8; 32]>,
    /// Reads need a token too.
    pub protect_reads: bool,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("tokens", &self.tokens.len())
            .field("protect_reads", &self.protect_reads)
            .finish()
    }
}

impl AuthConfig {
    /// Accepts any of `tokens` (several, so they can be rotated); empty ones
    /// are ignored.
    pub fn new<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>, protect_reads: bool) -> Self {
        Self {
            tokens: tokens
                .into_iter()
                .map(|t| t.as_ref().trim().to_owned())
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
            protect_reads,
        }
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks `presented` against every configured token without stopping at
    /// a match, so timing tells nothing about which or how much matched.
    fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.tokens
            .iter()
            .fold(subtle::Choice::from(0), |found, t| found | t.ct_eq(&digest))
            .into()
    }

    fn required(&self, method: &Method, path: &str) -> bool {
        if !self.enabled() || !path.starts_with("/api/") {
            return false;
        }
        let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        let admin = path.starts_with("/api/v1/sync/tasks");
        !read || admin || self.protect_reads
    }
}

/// Puts `auth` in front of `router`: the bearer-token scheme of every
/// role's HTTP API.
pub fn protect<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    auth: AuthConfig,
) -> axum::Router<S> {
    router.layer(axum::middleware::from_fn_with_state(
        std::sync::Arc::new(auth),
        require_token,
    ))
}

/// Rejects a request that needs a token and has none (401) or a wrong one
/// (403), before its body is read.
async fn require_token(
    State(auth): State<std::sync::Arc<AuthConfig>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !auth.required(req.method(), req.uri().path()) {
        return Ok(next.run(req).await);
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| {
            ApiError::Unauthorized("this endpoint needs an `Authorization: Bearer` token".into())
        })?;
    if !auth.accepts(token) {
        return Err(ApiError::Forbidden);
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_token_is_accepted_and_nothing_else() {
        let auth = AuthConfig::new(["old-token", " new-token ", ""], false);
        assert!(auth.accepts("old-token"));
        assert!(auth.accepts("new-token"));
        assert!(!auth.accepts(""));
        assert!(!auth.accepts("old-token "));
        assert!(!auth.accepts("old-toke"));
    }

    #[test]
    fn writes_and_admin_need_a_token_reads_only_when_protected() {
        let open = AuthConfig::new(["t"], false);
        assert!(open.required(&Method::PUT, "/api/v1/orders/A"));
        assert!(open.required(&Method::POST, "/api/v1/orders"));
        assert!(open.required(&Method::GET, "/api/v1/sync/tasks"));
        assert!(!open.required(&Method::GET, "/api/v1/orders/A"));
        assert!(!open.required(&Method::GET, "/healthz"));
        assert!(!open.required(&Method::GET, "/metrics"));
        let closed = AuthConfig::new(["t"], true);
        assert!(closed.required(&Method::GET, "/api/v1/orders/A"));
        assert!(!closed.required(&Method::GET, "/openapi.json"));
        let none = AuthConfig::new(Vec::<String>::new(), true);
        assert!(!none.required(&Method::PUT, "/api/v1/orders/A"));
    }
}

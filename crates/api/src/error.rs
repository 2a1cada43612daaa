//! The one HTTP error type. Every error leaves as RFC 9457
//! `application/problem+json`; 5xx details are logged, never returned.

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::response::IntoResponse;
use domain::{FieldError, ValidationErrors};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    #[schema(example = "urn:orders-center:problem:validation-failed")]
    pub kind: String,
    /// Short summary of the kind.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For validation failures: every field that broke a rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    /// For 412: the order's current version, if it exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<i64>,
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed syntax: JSON, path, query or header.
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed but breaks the domain rules.
    #[error(transparent)]
    Validation(#[from] ValidationErrors),
    /// The body has the wrong shape: a wrong type, a missing field, an unknown enum value.
    #[error("{0}")]
    UnprocessableBody(String),
    /// The body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body is larger than the configured limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// No bearer token where one is required.
    #[error("{0}")]
    Unauthorized(String),
    /// A bearer token that is not one of the configured ones.
    #[error("the bearer token is not valid for this service")]
    Forbidden,
    /// The resource does not exist.
    #[error("{0}")]
    NotFound(String),
    /// `If-Match` / `If-None-Match` did not hold.
    #[error("{detail}")]
    PreconditionFailed {
        /// What did not match.
        detail: String,
        /// The current version, if the order exists.
        current_version: Option<i64>,
    },
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The idempotency key was used before with a different request.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// The database cannot be reached right now.
    #[error("the database is unavailable; retry later")]
    Unavailable(#[source] store::Error),
    /// The order cache is still warming up (readiness only).
    #[error("the order cache is warming up")]
    Warming,
    /// A bug or broken invariant; logged, answered with a generic 500.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        use store::Error as S;
        match e {
            S::NotFound(id) => Self::NotFound(format!("order {id} does not exist")),
            e @ S::PreconditionFailed { current, .. } => Self::PreconditionFailed {
                detail: e.to_string(),
                current_version: current,
            },
            S::IdempotencyKeyReused(key) => Self::IdempotencyKeyReused(format!(
                "Idempotency-Key {key:?} was already used with a different request body"
            )),
            S::InvalidCursor => Self::BadRequest("cursor is not one this service issued".into()),
            e @ S::TaskNotFound(_) => Self::NotFound(e.to_string()),
            e @ (S::TaskNotReplayable { .. } | S::CheckoutOnExisting(_) | S::SagaOwns { .. }) => {
                Self::Conflict(e.to_string())
            }
            e @ S::Unavailable(_) => Self::Unavailable(e),
            e @ S::SagasDisabled => Self::UnprocessableBody(e.to_string()),
            e => Self::Internal(Box::new(e)),
        }
    }
}

/// For the services that query with `sqlx` directly.
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        store::Error::from(e).into()
    }
}

impl ApiError {
    /// A 422 naming one field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Validation(ValidationErrors(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }]))
    }

    /// The HTTP status this error maps to.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Validation(_) | Self::UnprocessableBody(_) | Self::IdempotencyKeyReused(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unavailable(_) | Self::Warming => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document this error answers with; also the reason a
    /// consumer gives when it dead-letters a message the API would refuse.
    pub fn problem(&self) -> Problem {
        let status = self.status_code();
        let (detail, errors, current_version) = match self {
            Self::Validation(v) => (
                Some(format!("{} field(s) failed validation", v.0.len())),
                Some(v.0.clone()),
                None,
            ),
            Self::PreconditionFailed {
                current_version, ..
            } => (Some(self.to_string()), None, *current_version),
            _ => (Some(self.to_string()), None, None),
        };
        Problem {
            kind: problem_type(self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors,
            current_version,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad-request",
            Self::Validation(_) => "validation-failed",
            Self::UnprocessableBody(_) => "invalid-body",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::PreconditionFailed { .. } => "precondition-failed",
            Self::Conflict(_) => "conflict",
            Self::IdempotencyKeyReused(_) => "idempotency-key-reused",
            Self::Unavailable(_) => "unavailable",
            Self::Warming => "warming-up",
            Self::Internal(_) => "internal",
        }
    }
}

/// The problem type URI for a slug.
fn problem_type(slug: &str) -> String {
    format!("urn:orders-center:problem:{slug}")
}

/// Renders a problem document with the right media type.
pub fn problem_response(status: StatusCode, problem: &Problem) -> Response<Body> {
    let body = serde_json::to_vec(problem).expect("problems serialize");
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    res
}

/// A problem for a bare status, for errors raised outside our handlers.
pub fn status_problem(status: StatusCode) -> Problem {
    let title = status.canonical_reason().unwrap_or("Error").to_owned();
    Problem {
        kind: problem_type(&title.to_lowercase().replace(' ', "-")),
        title,
        status: status.as_u16(),
        detail: None,
        errors: None,
        current_version: None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let status = self.status_code();
        match &self {
            Self::Internal(e) => tracing::error!(error = %e, source = ?e, "request failed"),
            Self::Unavailable(e) => tracing::warn!(error = %e, "database unavailable"),
            _ => {}
        }
        let mut res = problem_response(status, &self.problem());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"orders-center\""),
            );
        }
        res
    }
}

/// Turns any error response not already in problem+json (axum's 404 and 405,
/// the timeout layer's 408, a caught panic) into one, so clients need to
/// parse only one error format.
pub async fn problem_for_every_error(res: axum::response::Response) -> axum::response::Response {
    let status = res.status();
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return res;
    }
    let mut out = problem_response(status, &status_problem(status));
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = res.headers().get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

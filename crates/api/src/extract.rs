//! Extractors whose rejections are [`ApiError`]s, and the request headers the
//! order endpoints understand.

use axum::extract::rejection::{BytesRejection, FailedToBufferBody, JsonRejection};
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use domain::OrderId;
use serde::de::DeserializeOwned;
use store::{IdempotencyKey, Precondition};

use crate::error::ApiError;
use crate::AppState;

/// `axum::Json` with problem+json rejections.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// The body limit a router enforces, for the 413 answer's detail.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl FromRef<AppState> for BodyLimit {
    fn from_ref(state: &AppState) -> Self {
        BodyLimit(state.config.limits.body_limit)
    }
}

/// The services (inventory, payments) keep only a pool as their state and
/// the default limits.
impl FromRef<sqlx::PgPool> for BodyLimit {
    fn from_ref(_: &sqlx::PgPool) -> Self {
        BodyLimit(http_server::Limits::default().body_limit)
    }
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    BodyLimit: FromRef<S>,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::UnprocessableBody(e.body_text())),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::BadRequest(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType(
                "expected Content-Type: application/json".into(),
            )),
            Err(JsonRejection::BytesRejection(BytesRejection::FailedToBufferBody(
                FailedToBufferBody::LengthLimitError(_),
            ))) => Err(ApiError::PayloadTooLarge(BodyLimit::from_ref(state).0)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// An id as a path segment may carry it: parsed by its own rules, so a
/// handler never sees (or sends the database) an id it could not store.
pub trait PathIdRule: Sized {
    /// What the id names, for the problem: `order id`, `id`.
    const WHAT: &'static str;

    /// The id, or what is wrong with `raw`.
    fn parse(raw: &str) -> Result<Self, String>;
}

impl PathIdRule for OrderId {
    const WHAT: &'static str = "order id";

    fn parse(raw: &str) -> Result<Self, String> {
        OrderId::parse(raw)
    }
}

/// A product or account id: 1-64 of `A-Z a-z 0-9 - _ .`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl PathIdRule for Name {
    const WHAT: &'static str = "id";

    fn parse(raw: &str) -> Result<Self, String> {
        domain::checkout::check_name(raw).map(|()| Self(raw.to_owned()))
    }
}

/// The `{id}` path segment of a route, checked against `T`'s rules: 400
/// with problem+json otherwise (a NUL byte included). Every role's routes
/// take their ids through it.
#[derive(Debug)]
pub struct PathId<T>(pub T);

impl<S: Send + Sync, T: PathIdRule> FromRequestParts<S> for PathId<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        T::parse(&raw)
            .map(Self)
            .map_err(|m| ApiError::BadRequest(format!("{} in the path {m}", T::WHAT)))
    }
}

/// `axum::extract::Query` with problem+json rejections.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // Text filters reach SQL, and PostgreSQL refuses NUL in text (22021,
        // a 500): no query value may hold a control character.
        let pairs = axum::extract::Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        if let Some((name, _)) = pairs
            .0
            .iter()
            .find(|(k, v)| k.chars().chain(v.chars()).any(char::is_control))
        {
            return Err(ApiError::BadRequest(format!(
                "query parameter {name:?} must not contain control characters"
            )));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::trim)
                .map_err(|_| ApiError::BadRequest(format!("{name} must be visible ASCII")))
        })
        .transpose()
}

/// The save precondition from `If-Match` (`"<version>"`, `W/"<version>"`,
/// a bare number, or `*`) and `If-None-Match: *`.
pub fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let if_match = header_str(headers, "if-match")?;
    let if_none_match = header_str(headers, "if-none-match")?;
    match (if_match, if_none_match) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "send either If-Match or If-None-Match, not both".into(),
        )),
        (Some("*"), None) => Ok(Precondition::Exists),
        (Some(tag), None) => {
            let v = tag.strip_prefix("W/").unwrap_or(tag);
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            v.parse::<i64>()
                .ok()
                .filter(|v| *v > 0)
                .map(Precondition::Version)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "If-Match must be an order version such as \"3\", got {tag:?}"
                    ))
                })
        }
        (None, Some("*")) => Ok(Precondition::Absent),
        (None, Some(other)) => Err(ApiError::BadRequest(format!(
            "only If-None-Match: * is supported, got {other:?}"
        ))),
        (None, None) => Ok(Precondition::None),
    }
}

/// The versions a reader names in `If-None-Match`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    any: bool,
    versions: Vec<i64>,
}

impl Seen {
    /// Whether an order at `version` is one the reader has (a 304).
    pub fn matches(&self, version: i64) -> bool {
        self.any || self.versions.contains(&version)
    }

    /// The newest version named; 0 when none.
    pub fn newest(&self) -> i64 {
        self.versions.iter().copied().max().unwrap_or(0)
    }
}

/// `If-None-Match` of a read: `*` or a list of ETags (`"3"`, `W/"3"`).
/// Tags this API never issues match nothing, as RFC 9110 has it.
pub fn seen_versions(headers: &HeaderMap) -> Result<Seen, ApiError> {
    let Some(value) = header_str(headers, "if-none-match")? else {
        return Ok(Seen::default());
    };
    if value == "*" {
        return Ok(Seen {
            any: true,
            versions: Vec::new(),
        });
    }
    let versions = value
        .split(',')
        .map(str::trim)
        .filter_map(|tag| {
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            tag.strip_prefix('"')?
                .strip_suffix('"')?
                .parse::<i64>()
                .ok()
        })
        .filter(|v| *v > 0)
        .collect();
    Ok(Seen {
        any: false,
        versions,
    })
}

/// Who is saving, from `X-User-Id`; empty when absent.
pub fn user_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let id = header_str(headers, "x-user-id")?.unwrap_or_default();
    domain::validation::validate_user_id(id)?;
    Ok(id.to_owned())
}

/// The optional `Idempotency-Key` of a create.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    header_str(headers, "idempotency-key")?
        .map(|k| {
            IdempotencyKey::parse(k)
                .map_err(|m| ApiError::BadRequest(format!("Idempotency-Key {m}")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn if_match_accepts_etags_and_bare_versions() {
        for v in ["\"3\"", "W/\"3\"", "3"] {
            assert_eq!(
                precondition(&headers(&[("if-match", v)])).unwrap(),
                Precondition::Version(3)
            );
        }
        assert_eq!(
            precondition(&headers(&[("if-match", "*")])).unwrap(),
            Precondition::Exists
        );
        assert_eq!(
            precondition(&headers(&[("if-none-match", "*")])).unwrap(),
            Precondition::Absent
        );
        assert_eq!(precondition(&HeaderMap::new()).unwrap(), Precondition::None);
    }

    #[test]
    fn if_none_match_of_a_read_names_versions() {
        let seen = seen_versions(&headers(&[("if-none-match", "\"4\", W/\"7\", \"x\"")])).unwrap();
        assert_eq!(seen.newest(), 7);
        assert!(seen.matches(4) && seen.matches(7) && !seen.matches(5));
        let any = seen_versions(&headers(&[("if-none-match", "*")])).unwrap();
        assert!(any.matches(1) && any.newest() == 0);
        assert_eq!(seen_versions(&HeaderMap::new()).unwrap(), Seen::default());
    }

    #[test]
    fn malformed_preconditions_are_bad_requests() {
        for h in [
            headers(&[("if-match", "\"abc\"")]),
            headers(&[("if-match", "0")]),
            headers(&[("if-none-match", "\"1\"")]),
            headers(&[("if-match", "1"), ("if-none-match", "*")]),
        ] {
            assert!(matches!(precondition(&h), Err(ApiError::BadRequest(_))));
        }
    }
}

//! Every 1C outcome is classified here and nowhere else: delivered,
//! transient (retry later, maybe after `Retry-After`) or permanent (dead).

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

/// What 1C did with a delivered version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// Stored: it was newer than what 1C held.
    Applied,
    /// 1C already had exactly this version (a retry after a lost answer).
    Duplicate,
    /// 1C already had a newer version and kept it.
    Stale,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 1C has this version or a newer one.
    Delivered(Applied),
    /// It did not work.
    Failed(Failure),
}

/// Why a delivery failed, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The kind of failure, for retry decisions and metrics.
    pub class: ErrorClass,
    /// How long 1C asked us to wait, if it did.
    pub retry_after: Option<Duration>,
    /// A human-readable reason, kept as the task's `last_error`.
    pub detail: String,
}

impl Failure {
    /// Worth retrying: 1C or the network may be fine later.
    pub fn is_transient(&self) -> bool {
        self.class.is_transient()
    }
}

/// Failure classes. Only [`ErrorClass::Rejected`] is permanent: it is about
/// this request, while every other class is about 1C or the path to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// No answer within the request timeout (or 408).
    Timeout,
    /// No connection could be made.
    Connect,
    /// 429: too many requests.
    Throttled,
    /// 503: 1C is unavailable.
    Unavailable,
    /// Any other 5xx.
    ServerError,
    /// 401/403: our credentials are wrong. Every request would fail the same
    /// way, so this waits for an operator instead of killing the backlog.
    Auth,
    /// 3xx: redirects are never followed, so credentials never leave for
    /// another host; this is a misconfigured URL.
    Redirect,
    /// Any other 4xx: 1C refuses this request as invalid.
    Rejected,
    /// Anything else: a broken connection mid-answer, an unreadable body.
    Other,
}

impl ErrorClass {
    /// Whether a retry can succeed.
    pub fn is_transient(self) -> bool {
        self != Self::Rejected
    }

    /// Whether 1C may still be working on the request: it was sent, but no
    /// answer came back. A newer version sent now could be overtaken by it.
    pub fn outcome_unknown(self) -> bool {
        matches!(self, Self::Timeout | Self::Other)
    }

    /// Whether it says something about 1C's health, so the circuit breaker
    /// should count it. A rejected request says nothing about 1C.
    pub fn counts_against_1c(self) -> bool {
        self != Self::Rejected
    }

    /// A stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Throttled => "throttled",
            Self::Unavailable => "unavailable",
            Self::ServerError => "server_error",
            Self::Auth => "auth",
            Self::Redirect => "redirect",
            Self::Rejected => "rejected",
            Self::Other => "other",
        }
    }
}

/// The longest `Retry-After` honoured; a larger value is capped, so a broken
/// header cannot park a task for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Classifies an HTTP answer from 1C.
pub fn classify_response(status: StatusCode, retry_after: Option<&str>, body: &str) -> Outcome {
    if status.is_success() {
        let applied = serde_json::from_str::<crate::ApplyResponse>(body)
            .map(|r| r.result)
            // 1C says 200 means stored; an unexpected body does not change that.
            .unwrap_or(Applied::Applied);
        return Outcome::Delivered(applied);
    }
    let class = match status.as_u16() {
        300..=399 => ErrorClass::Redirect,
        401 | 403 => ErrorClass::Auth,
        408 => ErrorClass::Timeout,
        429 => ErrorClass::Throttled,
        503 => ErrorClass::Unavailable,
        400..=499 => ErrorClass::Rejected,
        500..=599 => ErrorClass::ServerError,
        _ => ErrorClass::Other,
    };
    let snippet: String = body.chars().take(300).collect();
    Outcome::Failed(Failure {
        class,
        retry_after: retry_after.and_then(|v| parse_retry_after(v, Utc::now())),
        detail: format!("1C answered {status}: {}", snippet.trim()),
    })
}

/// Classifies a transport error (no HTTP answer).
pub(crate) fn classify_error(e: reqwest::Error) -> Outcome {
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else if e.is_connect() {
        ErrorClass::Connect
    } else {
        ErrorClass::Other
    };
    // Without the URL: it could carry credentials if someone put them there.
    let e = e.without_url();
    Outcome::Failed(Failure {
        class,
        retry_after: None,
        detail: format!("1C unreachable ({}): {}", class.as_str(), error_chain(&e)),
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Parses `Retry-After` as seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&Utc) - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16) -> Failure {
        match classify_response(StatusCode::from_u16(status).unwrap(), None, "nope") {
            Outcome::Failed(f) => f,
            other => panic!("{status} classified as {other:?}"),
        }
    }

    #[test]
    fn success_reports_what_1c_did() {
        for (body, applied) in [
            (r#"{"result":"applied","version":3}"#, Applied::Applied),
            (r#"{"result":"duplicate","version":3}"#, Applied::Duplicate),
            (r#"{"result":"stale","version":4}"#, Applied::Stale),
            ("not json", Applied::Applied),
        ] {
            assert_eq!(
                classify_response(StatusCode::OK, None, body),
                Outcome::Delivered(applied)
            );
        }
        assert!(matches!(
            classify_response(StatusCode::NO_CONTENT, None, ""),
            Outcome::Delivered(_)
        ));
    }

    #[test]
    fn every_failure_status_has_a_class() {
        let table = [
            (301, ErrorClass::Redirect, true),
            (307, ErrorClass::Redirect, true),
            (400, ErrorClass::Rejected, false),
            (401, ErrorClass::Auth, true),
            (403, ErrorClass::Auth, true),
            (404, ErrorClass::Rejected, false),
            (408, ErrorClass::Timeout, true),
            (409, ErrorClass::Rejected, false),
            (413, ErrorClass::Rejected, false),
            (422, ErrorClass::Rejected, false),
            (429, ErrorClass::Throttled, true),
            (500, ErrorClass::ServerError, true),
            (502, ErrorClass::ServerError, true),
            (503, ErrorClass::Unavailable, true),
            (504, ErrorClass::ServerError, true),
        ];
        for (status, class, transient) in table {
            let f = failure(status);
            assert_eq!(f.class, class, "{status}");
            assert_eq!(f.is_transient(), transient, "{status}");
            assert_eq!(f.class.counts_against_1c(), transient, "{status}");
            assert!(
                f.detail.contains(&status.to_string()),
                "{status}: {}",
                f.detail
            );
        }
    }

    #[test]
    fn retry_after_is_read_from_seconds_or_a_date_and_capped() {
        let now = DateTime::parse_from_rfc3339("2026-11-21T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sat, 21 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sat, 21 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn a_throttled_answer_keeps_its_retry_after() {
        let Outcome::Failed(f) = classify_response(StatusCode::TOO_MANY_REQUESTS, Some("12"), "")
        else {
            panic!("429 must fail");
        };
        assert_eq!(f.retry_after, Some(Duration::from_secs(12)));
    }
}

//! The mock's contract: auth, version rules, bad requests, faults and stats.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use onec_mock::{Faults, MockConfig, MockState, Stats};
use serde_json::{json, Value};

struct Mock {
    base: String,
    http: reqwest::Client,
}

async fn start(faults: Faults) -> Mock {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let config = MockConfig {
        username: "u".into(),
        password: "p".into(),
        faults,
    };
    onec_mock::spawn(listener, config, std::future::pending()).unwrap();
    Mock {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
    }
}

impl Mock {
    async fn deliver(&self, id: &str, version: i64) -> reqwest::Response {
        self.http
            .put(format!("{}/hs/orders/v1/orders/{id}", self.base))
            .basic_auth("u", Some("p"))
            .header("idempotency-key", format!("{id}:{version}"))
            .json(&json!({"version": version, "order": {"id": id}, "items": []}))
            .send()
            .await
            .unwrap()
    }

    async fn stats(&self) -> Stats {
        self.http
            .get(format!("{}/stats", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn newer_versions_apply_and_equal_or_older_ones_are_counted_not_applied() {
    let mock = start(Faults::default()).await;

    mock.deliver("A", 1).await;
    let mut answers = Vec::new();
    for v in [5, 5, 4, 6] {
        answers.push(mock.deliver("B", v).await.json::<Value>().await.unwrap());
    }

    assert_eq!(
        answers,
        [
            json!({"result": "applied", "version": 5}),
            json!({"result": "duplicate", "version": 5}),
            json!({"result": "stale", "version": 5}),
            json!({"result": "applied", "version": 6}),
        ]
    );
    let held: Value = mock
        .http
        .get(format!("{}/hs/orders/v1/orders/B", mock.base))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(held["version"], 6);
    let s = mock.stats().await;
    assert_eq!(s.received, s.applied + s.duplicates + s.stale);
    assert_eq!(s.orders, 2);
}

#[tokio::test]
async fn wrong_credentials_are_401_and_bad_requests_are_400_with_a_reason() {
    let mock = start(Faults::default()).await;
    let url = format!("{}/hs/orders/v1/orders/A", mock.base);

    let no_auth = mock
        .http
        .put(&url)
        .json(&json!({"version": 1, "order": {"id": "A"}}))
        .send()
        .await
        .unwrap();
    let wrong = mock
        .http
        .put(&url)
        .basic_auth("u", Some("x"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (no_auth.status().as_u16(), wrong.status().as_u16()),
        (401, 401)
    );

    for (body, key, reason) in [
        (json!({"order": {"id": "A"}}), "A:1", "version"),
        (
            json!({"version": 0, "order": {"id": "A"}}),
            "A:0",
            "positive",
        ),
        (
            json!({"version": 1, "order": {"id": "B"}}),
            "A:1",
            "order.id",
        ),
        (
            json!({"version": 1, "order": {"id": "A"}}),
            "A:2",
            "Idempotency-Key",
        ),
    ] {
        let res = mock
            .http
            .put(&url)
            .basic_auth("u", Some("p"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
        let err: Value = res.json().await.unwrap();
        assert!(err["error"].as_str().unwrap().contains(reason), "{err}");
    }
    let s = mock.stats().await;
    assert_eq!((s.unauthorized, s.rejected, s.received), (2, 4, 0));
}

#[tokio::test]
async fn an_outage_refuses_everything_until_it_is_lifted_at_run_time() {
    let mock = start(Faults {
        outage: true,
        retry_after_secs: 3,
        ..Faults::default()
    })
    .await;

    let down = mock.deliver("A", 1).await;
    assert_eq!(down.status(), 503);
    assert_eq!(down.headers()["retry-after"], "3");

    let lifted = mock
        .http
        .put(format!("{}/admin/faults", mock.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(lifted.status(), 200);
    assert_eq!(mock.deliver("A", 1).await.status(), 200);
    let s = mock.stats().await;
    assert_eq!((s.outage_rejections, s.applied), (1, 1));
}

#[tokio::test]
async fn injected_errors_after_apply_turn_retries_into_duplicates() {
    let mock = start(Faults {
        error_rate: 1.0,
        fail_after_apply: 1.0,
        ..Faults::default()
    })
    .await;

    let first = mock.deliver("A", 1).await.status();
    mock.http
        .put(format!("{}/admin/faults", mock.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let retry = mock.deliver("A", 1).await.json::<Value>().await.unwrap();

    assert!([500, 503, 429].contains(&first.as_u16()), "{first}");
    assert_eq!(retry["result"], "duplicate");
    let s = mock.stats().await;
    assert_eq!(
        (s.applied, s.duplicates, s.responses_lost, s.injected_errors),
        (1, 1, 1, 1)
    );
}

#[tokio::test]
async fn injected_errors_before_apply_store_nothing() {
    let mock = start(Faults {
        error_rate: 1.0,
        fail_after_apply: 0.0,
        ..Faults::default()
    })
    .await;

    let statuses: Vec<u16> = futures::future::join_all((1..=30).map(|v| {
        let mock = &mock;
        async move { mock.deliver("A", v).await.status().as_u16() }
    }))
    .await;

    assert!(
        statuses.iter().all(|s| [500, 503, 429].contains(s)),
        "{statuses:?}"
    );
    let kinds: std::collections::HashSet<_> = statuses.into_iter().collect();
    assert!(
        kinds.len() > 1,
        "errors should vary between 500, 503 and 429"
    );
    let s = mock.stats().await;
    assert_eq!((s.applied, s.orders, s.injected_errors), (0, 0, 30));
}

#[tokio::test]
async fn latency_and_a_slow_body_delay_the_answer() {
    let mock = start(Faults {
        latency_ms: 150,
        slow_body_ms: 200,
        ..Faults::default()
    })
    .await;
    let started = Instant::now();

    let res = mock.deliver("A", 1).await;
    let headers_after = started.elapsed();
    let body: Value = res.json().await.unwrap();

    assert!(
        headers_after >= Duration::from_millis(150),
        "{headers_after:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(330),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(body["result"], "applied");
}

#[tokio::test]
async fn invalid_fault_settings_are_refused() {
    let mock = start(Faults::default()).await;
    for body in [json!({"error_rate": 1.5}), json!({"nonsense": true})] {
        let res = mock
            .http
            .put(format!("{}/admin/faults", mock.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_client_error(), "{body}");
    }
    assert!(MockState::new(MockConfig {
        faults: Faults {
            slow_rate: -1.0,
            ..Faults::default()
        },
        ..MockConfig::default()
    })
    .is_err());
}

#[tokio::test]
async fn concurrent_deliveries_are_counted_in_flight() {
    let mock = start(Faults {
        latency_ms: 100,
        ..Faults::default()
    })
    .await;

    futures::future::join_all((0..8).map(|i| {
        let mock = &mock;
        async move { mock.deliver(&format!("O{i}"), 1).await }
    }))
    .await;

    let s = mock.stats().await;
    assert!(s.max_in_flight >= 4, "{s:?}");
    assert_eq!((s.in_flight, s.applied), (0, 8));
}

/// The admin endpoints need the mock's credentials from another host, and
/// trust loopback (the tour in `dev`, a port-forward into the pod).
#[tokio::test]
async fn admin_endpoints_need_credentials_unless_called_from_loopback() {
    use tower::ServiceExt;
    let router = onec_mock::router(
        MockState::new(MockConfig {
            username: "u".into(),
            password: "p".into(),
            faults: Faults::default(),
        })
        .unwrap(),
    );
    let call = |peer: &str, auth: Option<&str>| {
        let mut request = axum::http::Request::get("/admin/orders");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let mut request = request.body(axum::body::Body::empty()).unwrap();
        let peer: SocketAddr = peer.parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        router.clone().oneshot(request)
    };
    let status = |r: axum::response::Response| r.status().as_u16();
    assert_eq!(status(call("10.1.2.3:5000", None).await.unwrap()), 401);
    assert_eq!(
        status(
            call("10.1.2.3:5000", Some("Basic dTp3cm9uZw=="))
                .await
                .unwrap()
        ),
        401
    );
    // "u:p"
    assert_eq!(
        status(call("10.1.2.3:5000", Some("Basic dTpw")).await.unwrap()),
        200
    );
    assert_eq!(status(call("127.0.0.1:5000", None).await.unwrap()), 200);
}

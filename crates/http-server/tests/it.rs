//! The limits, on a real socket.

use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use http_server::{serve, with_limits, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const LIMITS: Limits = Limits {
    body_limit: 1024,
    request_timeout: Duration::from_millis(800),
    header_timeout: Duration::from_millis(500),
    max_connections: 64,
};

/// A server with `/` (fast), `/slow` (answers after 300 ms) and `/echo`
/// (reads the body); returns its address and the shutdown trigger.
async fn start() -> (
    String,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let app = with_limits(
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow ok"
                }),
            )
            .route(
                "/echo",
                post(|body: String| async move { body.len().to_string() }),
            ),
        &LIMITS,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = oneshot::channel();
    let server = tokio::spawn(async move {
        serve(listener, app, &LIMITS, async {
            let _ = rx.await;
        })
        .await
    });
    (addr, tx, server)
}

/// Reads until the peer closes; returns what arrived and when it closed.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut buf))
        .await
        .expect("the server kept the connection open")
        .ok();
    (
        String::from_utf8_lossy(&buf).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let (addr, _stop, _) = start().await;
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // One header byte every 100 ms, never finishing the headers.
    let trickle = async {
        for _ in 0..30 {
            if slow.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let other = async {
        let body = reqwest::get(format!("http://{addr}/"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "ok", "a well-behaved client is served meanwhile");
    };
    tokio::join!(trickle, other);
    let (_, _) = read_to_close(&mut slow, Duration::from_secs(2)).await;
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_millis(3500),
        "the trickling client was held for {cut_after:?}"
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_header_timeout() {
    let (addr, _stop, _) = start().await;
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    let (_, after) = read_to_close(&mut idle, Duration::from_secs(3)).await;
    assert!(
        after >= Duration::from_millis(400),
        "closed too early: {after:?}"
    );
    assert!(
        after < Duration::from_millis(1500),
        "closed too late: {after:?}"
    );
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_when_idle() {
    let (addr, _stop, _) = start().await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, after) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(after < Duration::from_millis(1500), "idle for {after:?}");
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_answered_408() {
    let (addr, _stop, _) = start().await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        .await
        .unwrap();
    let (answer, after) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        after < Duration::from_millis(1500),
        "answered after {after:?}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413() {
    let (addr, _stop, _) = start().await;
    let client = reqwest::Client::new();
    let small = client
        .post(format!("http://{addr}/echo"))
        .body("a".repeat(1024))
        .send()
        .await
        .unwrap();
    assert_eq!(small.text().await.unwrap(), "1024");
    let big = client
        .post(format!("http://{addr}/echo"))
        .body("a".repeat(1025))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_and_stops_accepting() {
    let (addr, stop, server) = start().await;
    let in_flight = tokio::spawn({
        let addr = addr.clone();
        async move {
            reqwest::get(format!("http://{addr}/slow"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    assert_eq!(in_flight.await.unwrap(), "slow ok");
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("serve returned after draining")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(&addr).await.is_err(), "still accepting");
}

/// Cleartext HTTP/2 with prior knowledge once kept connections open forever
/// by answering the server's pings. HTTP/2 is not served: the preface is a
/// malformed HTTP/1 request, and the connection is closed at once.
#[tokio::test]
async fn http2_prior_knowledge_connections_are_closed_promptly() {
    let (addr, _stop, _) = start().await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        // The client preface, then an empty SETTINGS frame.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        clients.push(s);
    }
    for mut s in clients {
        let (answer, after) = read_to_close(&mut s, Duration::from_secs(3)).await;
        assert!(after < Duration::from_millis(1000), "open for {after:?}");
        assert!(!answer.contains("HTTP/2"), "{answer}");
    }
}

/// At the cap, a further client waits until a connection ends.
#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let limits = Limits {
        max_connections: 2,
        ..LIMITS
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = Router::new().route("/", get(|| async { "ok" }));
    tokio::spawn(async move { serve(listener, app, &limits, std::future::pending()).await });

    // Two clients hold both slots with a request left half-sent.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        holders.push(s);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_to_close(&mut third, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Served only once the header timeout (500 ms) cut a holder off.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "served after {:?}, past the cap",
        started.elapsed()
    );
}

#[test]
fn method_labels_come_from_a_bounded_set() {
    use axum::http::Method;
    assert_eq!(http_server::method_label(&Method::PUT), "PUT");
    let odd = Method::from_bytes(b"M12345").unwrap();
    assert_eq!(http_server::method_label(&odd), "other");
}

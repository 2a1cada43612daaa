use std::time::{Duration, Instant};

use crate::support::{line_containing, lines, orders_center, stop, url_in, wait_healthy};

#[tokio::test]
async fn migrate_applies_every_migration_once_and_can_run_again() {
    let db = testkit::unmigrated_database().await;

    for _ in 0..2 {
        let out = orders_center(&["migrate"])
            .env("DATABASE_URL", &db.url)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, store::MIGRATOR.iter().count());
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename IN
         ('orders', 'order_items', 'order_payments', 'order_history', 'outbox', 'idempotency_keys')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables, 6);
}

#[tokio::test]
async fn api_without_a_database_url_says_what_is_missing() {
    let out = orders_center(&["api"]).output().await.unwrap();

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}

/// The `api` role as the chart runs it: migrate on start, JSON logs, and a
/// clean exit on SIGTERM.
#[tokio::test]
async fn the_api_role_migrates_serves_and_exits_cleanly_on_sigterm() {
    let db = testkit::unmigrated_database().await;
    let started = Instant::now();
    let mut api = orders_center(&["api", "--listen", "127.0.0.1:0", "--migrate"])
        .env("DATABASE_URL", &db.url)
        .env("LOG_FORMAT", "json")
        .spawn()
        .unwrap();
    let mut err = lines(api.stderr.take());
    let line = line_containing(&mut err, "api listening", Duration::from_secs(30)).await;
    let log: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    let base = url_in(log["fields"]["url"].as_str().unwrap());

    wait_healthy(&format!("{base}/readyz"), started + Duration::from_secs(30)).await;
    let saved = reqwest::Client::new()
        .put(format!("{base}/api/v1/orders/ROLE-1"))
        .json(&testkit::sample_order("ROLE-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 201);

    stop(&mut api, "TERM", Duration::from_secs(15)).await;
}

/// Every listener of the binary is the hardened one: a client trickling
/// header bytes is cut off, a 10 MB body is refused unread, and writes need
/// the configured token.
#[tokio::test]
async fn the_api_listener_cuts_off_slow_clients_and_needs_a_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let db = testkit::database().await;
    let mut api = orders_center(&["api", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &db.url)
        .env("HEADER_TIMEOUT", "1s")
        .env("API_TOKENS", "role-test-token")
        .spawn()
        .unwrap();
    let mut err = lines(api.stderr.take());
    let line = line_containing(&mut err, "api listening", Duration::from_secs(30)).await;
    let base = url_in(&line);
    let addr = base.trim_start_matches("http://").to_owned();

    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"PUT /api/v1/orders/X HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    for _ in 0..40 {
        if slow.write_all(b"a").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest))
        .await
        .expect("the slow client was never cut off")
        .ok();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held {:?}",
        started.elapsed()
    );

    let http = reqwest::Client::new();
    let huge = http
        .put(format!("{base}/api/v1/orders/BIG"))
        .bearer_auth("role-test-token")
        .header("content-type", "application/json")
        .body(vec![b' '; 10 * 1024 * 1024])
        .send()
        .await;
    // The server answers 413 and closes without reading the rest, so the
    // client may see that answer or a reset while it is still sending.
    match huge {
        Ok(res) => assert_eq!(res.status(), 413),
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    let anonymous = http
        .put(format!("{base}/api/v1/orders/ANON"))
        .json(&testkit::sample_order("ANON"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(orders, 0, "a refused request wrote an order");

    stop(&mut api, "TERM", Duration::from_secs(15)).await;
}

#[tokio::test]
async fn the_tasks_cli_lists_and_replays_dead_tasks() {
    let db = testkit::database().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (event_id, destination, aggregatetype, type, aggregateid, version, payload, state, attempts, last_error, finished_at)
         VALUES (gen_random_uuid(), 'onec', 'order', 'order.updated', 'CLI-1', 1, '{}', 'dead', 12, '1C answered 400 Bad Request: bad iin', now())
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let cli = |args: &[&str]| {
        let mut c = orders_center(args);
        c.env("DATABASE_URL", &db.url);
        c
    };

    let listed = cli(&["tasks", "list", "--state", "dead"])
        .output()
        .await
        .unwrap();
    let replayed = cli(&["tasks", "retry", &id.to_string()])
        .output()
        .await
        .unwrap();
    let again = cli(&["tasks", "retry", &id.to_string()])
        .output()
        .await
        .unwrap();

    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success());
    assert!(
        table.contains("CLI-1") && table.contains("bad iin"),
        "{table}"
    );
    assert!(replayed.status.success());
    assert!(String::from_utf8_lossy(&replayed.stdout).contains("pending again"));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("only dead tasks can be replayed"));
    let state: String = sqlx::query_scalar("SELECT state FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "pending");
}

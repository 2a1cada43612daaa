//! The inbox on a real PostgreSQL: duplicates change nothing, poison is
//! told apart from an unreachable database, and one refused message does
//! not take its batch down with it.

use inbox::journal::Journal;
use inbox::{ConsumerMetrics, Handler, Inbox, Incoming, Poison, Verdict};
use sqlx::PgConnection;

fn notice(order: &str, version: i64) -> (String, Vec<u8>) {
    let id = uuid::Uuid::now_v7();
    let body = serde_json::json!({
        "idempotent_key": id, "order_id": order, "version": version, "status": "new",
        "type": if version == 1 { "order.created" } else { "order.updated" },
        "occurred_at": chrono::Utc::now(),
    });
    (id.to_string(), serde_json::to_vec(&body).unwrap())
}

fn incoming((id, payload): &(String, Vec<u8>)) -> Incoming {
    Incoming {
        id: Some(id.clone()),
        payload: payload.clone(),
        origin: "test".into(),
        signature: None,
    }
}

async fn journal_rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM order_journal")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_duplicate_in_the_batch_or_from_before_changes_nothing() {
    let db = testkit::database().await;
    let metrics = ConsumerMetrics::unregistered();
    let inbox = Inbox::new(
        db.pool.clone(),
        "journal",
        Journal::new("journal"),
        metrics.clone(),
    );
    let (a, b) = (notice("O-1", 1), notice("O-1", 2));
    assert_eq!(
        inbox.process(&[incoming(&a)]).await.unwrap(),
        [Verdict::Applied]
    );
    let verdicts = inbox
        .process(&[incoming(&a), incoming(&b), incoming(&b)])
        .await
        .unwrap();
    assert_eq!(
        verdicts,
        [Verdict::Duplicate, Verdict::Applied, Verdict::Duplicate]
    );
    assert_eq!(journal_rows(&db.pool).await, 2);
    assert_eq!(
        (
            metrics.count("journal", "applied"),
            metrics.count("journal", "duplicate")
        ),
        (2, 2)
    );
}

#[tokio::test]
async fn poison_is_classified_and_the_rest_of_the_batch_applies() {
    let db = testkit::database().await;
    let inbox = Inbox::new(
        db.pool.clone(),
        "journal",
        Journal::new("journal"),
        ConsumerMetrics::unregistered(),
    );
    let good = notice("O-2", 1);
    let mut no_id = incoming(&notice("O-3", 1));
    no_id.id = None;
    let bad_json = Incoming {
        payload: b"{".to_vec(),
        ..incoming(&notice("O-4", 1))
    };
    let verdicts = inbox
        .process(&[no_id, bad_json, incoming(&good)])
        .await
        .unwrap();
    let classes: Vec<&str> = verdicts
        .iter()
        .map(|v| match v {
            Verdict::Dead(p) => p.class,
            Verdict::Applied => "applied",
            Verdict::Duplicate => "duplicate",
        })
        .collect();
    assert_eq!(classes, ["no_id", "bad_json", "applied"]);
    // Poison is not recorded: a fixed copy with the same id still applies.
    let inbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(inbox_rows, 1);
}

/// Applies by running the payload as SQL: `SELECT 1` goes, `SELECT 1/0` is
/// refused by the database for this message alone.
struct RunsSql;

#[async_trait::async_trait]
impl Handler for RunsSql {
    type Message = String;

    fn decode(&self, incoming: &Incoming) -> Result<String, Poison> {
        String::from_utf8(incoming.payload.clone())
            .map_err(|e| Poison::new("bad_json", e.to_string()))
    }

    async fn apply(&self, conn: &mut PgConnection, sql: &String) -> sqlx::Result<()> {
        sqlx::query(sql).execute(conn).await.map(drop)
    }
}

#[tokio::test]
async fn a_message_the_database_refuses_is_buried_alone_and_an_outage_is_an_error() {
    let db = testkit::database().await;
    let inbox = Inbox::new(
        db.pool.clone(),
        "sql",
        RunsSql,
        ConsumerMetrics::unregistered(),
    );
    let message = |id: &str, sql: &str| Incoming {
        id: Some(id.into()),
        payload: sql.as_bytes().to_vec(),
        origin: "test".into(),
        signature: None,
    };
    let verdicts = inbox
        .process(&[
            message("1", "SELECT 1"),
            message("2", "SELECT 1/0"),
            message("3", "SELECT 1"),
        ])
        .await
        .unwrap();
    assert_eq!(verdicts[0], Verdict::Applied);
    assert!(
        matches!(&verdicts[1], Verdict::Dead(p) if p.class == "apply_failed" && p.reason.contains("division by zero")),
        "{verdicts:?}"
    );
    assert_eq!(verdicts[2], Verdict::Applied);
    let recorded: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM inbox WHERE consumer = 'sql' ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, ["1", "3"]);

    // With the database gone, nothing is decided: the transport retries.
    db.pool.close().await;
    assert!(inbox.process(&[message("4", "SELECT 1")]).await.is_err());
}

/// Records `<key>/<n>` with its transaction; `<key>/<n>/refuse` is refused
/// by the database.
struct Keyed;

#[async_trait::async_trait]
impl Handler for Keyed {
    type Message = (String, i32, bool);

    fn decode(&self, incoming: &Incoming) -> Result<Self::Message, Poison> {
        let text = String::from_utf8_lossy(&incoming.payload).into_owned();
        let mut parts = text.split('/');
        let key = parts.next().unwrap_or_default().to_owned();
        let n = parts.next().and_then(|n| n.parse().ok());
        let n = n.ok_or_else(|| Poison::new("bad_json", text.clone()))?;
        Ok((key, n, parts.next() == Some("refuse")))
    }

    fn ordering_key<'m>(&self, m: &'m Self::Message) -> Option<&'m str> {
        Some(&m.0)
    }

    async fn apply(&self, conn: &mut PgConnection, m: &Self::Message) -> sqlx::Result<()> {
        if m.2 {
            sqlx::query("SELECT 1/0").execute(&mut *conn).await?;
        }
        sqlx::query("INSERT INTO keyed (key, n, tx) VALUES ($1, $2, txid_current())")
            .bind(&m.0)
            .bind(m.1)
            .execute(conn)
            .await
            .map(drop)
    }
}

#[tokio::test]
async fn a_batch_split_over_transactions_keeps_each_keys_messages_together_and_in_order() {
    let db = testkit::database().await;
    sqlx::query("CREATE TABLE keyed (seq serial, key text, n int, tx bigint)")
        .execute(&db.pool)
        .await
        .unwrap();
    let inbox = Inbox::new(
        db.pool.clone(),
        "keyed",
        Keyed,
        ConsumerMetrics::unregistered(),
    )
    .with_transactions(2);
    let message = |body: String| Incoming {
        id: Some(body.clone()),
        payload: body.into_bytes(),
        origin: "test".into(),
        signature: None,
    };
    // Eight keys, four messages each, interleaved as a topic would hold them.
    let batch: Vec<Incoming> = (0..4)
        .flat_map(|n| (0..8).map(move |k| format!("K{k}/{n}")))
        .map(message)
        .collect();
    let verdicts = inbox.process(&batch).await.unwrap();
    assert!(
        verdicts.iter().all(|v| *v == Verdict::Applied),
        "{verdicts:?}"
    );
    let rows: Vec<(String, i32, i64)> = sqlx::query_as("SELECT key, n, tx FROM keyed ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 32);
    let mut by_key: std::collections::BTreeMap<&str, Vec<(i32, i64)>> = Default::default();
    for (key, n, tx) in &rows {
        by_key.entry(key).or_default().push((*n, *tx));
    }
    for (key, applied) in &by_key {
        let order: Vec<i32> = applied.iter().map(|a| a.0).collect();
        assert_eq!(order, [0, 1, 2, 3], "{key} applied out of order");
        assert!(applied.iter().all(|a| a.1 == applied[0].1), "{key} split");
    }
    let transactions: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.2).collect();
    assert_eq!(transactions.len(), 2, "one batch, two transactions");

    // A refused message in one part buries only itself; the rest of both
    // parts applies.
    let mut batch: Vec<Incoming> = (0..8).map(|k| message(format!("K{k}/4"))).collect();
    batch[3] = message("K3/4/refuse".into());
    let verdicts = inbox.process(&batch).await.unwrap();
    for (i, v) in verdicts.iter().enumerate() {
        if i == 3 {
            assert!(
                matches!(v, Verdict::Dead(p) if p.class == "apply_failed"),
                "{v:?}"
            );
        } else {
            assert_eq!(*v, Verdict::Applied, "message {i}");
        }
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM keyed")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(total, 39);
}

/// The PostgreSQL transport takes a batch in one inbox transaction: one
/// outcome per message, poison refused for good alone, a repeat a success.
#[tokio::test]
async fn the_local_sink_applies_a_batch_at_once_and_refuses_only_the_poison() {
    use sink::Sink;
    let db = testkit::database().await;
    let sink = inbox::local::LocalSink::new(Inbox::new(
        db.pool.clone(),
        "journal",
        Journal::new("journal"),
        ConsumerMetrics::unregistered(),
    ));
    let message = |(id, payload): &(String, Vec<u8>), key: &str| sink::Message {
        event_id: id.parse().unwrap(),
        aggregate_type: "order".into(),
        aggregate_id: key.into(),
        kind: "order.updated".into(),
        version: 1,
        payload: serde_json::value::RawValue::from_string(
            String::from_utf8(payload.clone()).unwrap(),
        )
        .unwrap(),
        traceparent: None,
        signature: None,
    };
    let poison = (
        uuid::Uuid::now_v7().to_string(),
        br#"{"not": "a notice"}"#.to_vec(),
    );
    let batch = [
        message(&notice("O-1", 1), "O-1"),
        message(&notice("O-2", 1), "O-2"),
        message(&poison, "O-3"),
        message(&notice("O-1", 2), "O-1"),
    ];
    let kinds = |outcomes: Vec<sink::Outcome>| -> Vec<Option<sink::FailureKind>> {
        outcomes
            .iter()
            .map(|o| o.as_ref().err().map(|f| f.kind))
            .collect()
    };
    let refused = Some(sink::FailureKind::Permanent);
    assert_eq!(
        kinds(sink.deliver_batch(&batch).await),
        [None, None, refused, None]
    );
    assert_eq!(journal_rows(&db.pool).await, 3);
    assert_eq!(
        kinds(sink.deliver_batch(&batch).await),
        [None, None, refused, None],
        "again: duplicates are successes"
    );
    assert_eq!(journal_rows(&db.pool).await, 3);
}

/// Adds one to row `<key>` of `counters`, holding the row a moment.
struct Counting;

#[async_trait::async_trait]
impl Handler for Counting {
    type Message = String;

    fn decode(&self, incoming: &Incoming) -> Result<String, Poison> {
        Ok(String::from_utf8_lossy(&incoming.payload)
            .split('#')
            .next()
            .unwrap_or_default()
            .to_owned())
    }

    fn ordering_key<'m>(&self, key: &'m String) -> Option<&'m str> {
        Some(key)
    }

    async fn apply(&self, conn: &mut PgConnection, key: &String) -> sqlx::Result<()> {
        sqlx::query("UPDATE counters SET n = n + 1 WHERE key = $1")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        sqlx::query("SELECT pg_sleep(0.02)")
            .execute(conn)
            .await
            .map(drop)
    }
}

/// Two batches of one consumer at once (two queues of the orchestrator)
/// that touch the same keys in opposite orders lock them in key order, so
/// one waits for the other instead of both deadlocking.
#[tokio::test]
async fn concurrent_batches_over_the_same_keys_wait_instead_of_deadlocking() {
    let db = testkit::database().await;
    sqlx::query("CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO counters SELECT 'K' || g, 0 FROM generate_series(0, 9) g")
        .execute(&db.pool)
        .await
        .unwrap();
    let inbox = Inbox::new(
        db.pool.clone(),
        "counting",
        Counting,
        ConsumerMetrics::unregistered(),
    );
    let batch = |keys: Vec<i32>, tag: &str| -> Vec<Incoming> {
        keys.into_iter()
            .map(|k| Incoming {
                id: Some(format!("K{k}#{tag}")),
                payload: format!("K{k}#{tag}").into_bytes(),
                origin: "test".into(),
                signature: None,
            })
            .collect()
    };
    let up = batch((0..10).collect(), "up");
    let down = batch((0..10).rev().collect(), "down");
    let (a, b) = tokio::join!(inbox.process(&up), inbox.process(&down));
    for verdicts in [a.unwrap(), b.unwrap()] {
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Applied),
            "{verdicts:?}"
        );
    }
    let counts: Vec<i32> = sqlx::query_scalar("SELECT n FROM counters ORDER BY key")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(counts, [2; 10]);
}

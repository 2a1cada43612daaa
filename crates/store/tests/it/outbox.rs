use std::time::Duration;

use domain::{OrderFull, OrderId, ValidOrder};
use sqlx::postgres::PgListener;
use store::{Precondition, SaveContext, Store};

fn order(id: &str, status: &str) -> ValidOrder {
    let full: OrderFull =
        serde_json::from_value(testkit::sample_order_with(id, status, 10.0)).unwrap();
    full.validate(Some(&OrderId::parse(id).unwrap())).unwrap()
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Makes every outbox insert for order `key` fail, as a full disk or a
/// broken constraint would.
async fn refuse_outbox_rows_of(pool: &sqlx::PgPool, key: &str) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_outbox_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.aggregateid = '{key}' THEN RAISE EXCEPTION 'outbox refused'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_outbox_row BEFORE INSERT OR UPDATE ON outbox
             FOR EACH ROW EXECUTE FUNCTION refuse_outbox_row();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// The outbox guarantee: if the task row cannot be written, neither is the order.
#[tokio::test]
async fn a_failing_task_insert_rolls_back_the_whole_save() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    refuse_outbox_rows_of(&db.pool, "ATOM").await;

    let result = store
        .save_order(
            &order("ATOM", "new"),
            Precondition::None,
            &SaveContext::default(),
        )
        .await;

    assert!(
        matches!(result, Err(store::Error::Database(_))),
        "{result:?}"
    );
    for table in ["orders", "order_items", "order_payments", "order_history"] {
        assert_eq!(
            count(&db.pool, table).await,
            0,
            "{table} kept rows of a failed save"
        );
    }
}

#[tokio::test]
async fn a_failing_task_insert_leaves_an_existing_order_untouched() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    store
        .save_order(
            &order("KEEP", "new"),
            Precondition::None,
            &SaveContext::default(),
        )
        .await
        .unwrap();
    refuse_outbox_rows_of(&db.pool, "KEEP").await;

    let result = store
        .save_order(
            &order("KEEP", "paid"),
            Precondition::None,
            &SaveContext::default(),
        )
        .await;

    assert!(result.is_err());
    let kept = store
        .get_order(&OrderId::parse("KEEP").unwrap())
        .await
        .unwrap();
    assert_eq!((kept.version, kept.full.order.status.as_str()), (1, "new"));
    assert_eq!(kept.full.items.len(), 3);
    assert_eq!(kept.full.history.len(), 2);
}

/// Relays are woken by the save's NOTIFY, which PostgreSQL delivers at commit
/// and drops on rollback.
#[tokio::test]
async fn a_committed_save_notifies_the_relays_and_a_failed_one_does_not() {
    let db = testkit::database().await;
    let store = Store::new(db.pool.clone());
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(store::NOTIFY_CHANNEL).await.unwrap();

    refuse_outbox_rows_of(&db.pool, "FAIL").await;
    assert!(store
        .save_order(
            &order("FAIL", "new"),
            Precondition::None,
            &SaveContext::default()
        )
        .await
        .is_err());
    store
        .save_order(
            &order("OK", "new"),
            Precondition::None,
            &SaveContext::default(),
        )
        .await
        .unwrap();

    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification within 5 s")
        .unwrap();
    assert_eq!(first.channel(), store::NOTIFY_CHANNEL);
    let second = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(second.is_err(), "only the committed save may notify");
}

/// A save's event-stream copies are appended to the log in the saving
/// transaction, and 1C keeps its outbox row.
#[tokio::test]
async fn event_streams_are_appended_to_the_log_and_1c_keeps_its_row() {
    let db = testkit::database().await;
    let kafka: domain::Destination = "kafka".parse().unwrap();
    let routes = domain::Routes::default()
        .with(domain::OrderEvent::Created, kafka.clone())
        .with(domain::OrderEvent::Updated, kafka);
    let store = Store::new(db.pool.clone()).with_routes(routes);
    let ctx = SaveContext::default();
    store
        .save_order(&order("LOG-1", "new"), Precondition::None, &ctx)
        .await
        .unwrap();
    store
        .save_order(&order("LOG-1", "paid"), Precondition::None, &ctx)
        .await
        .unwrap();
    let outbox: Vec<(String, String)> =
        sqlx::query_as("SELECT destination, type FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(outbox.iter().all(|(d, _)| d == "onec"), "{outbox:?}");
    let logged: Vec<(String, String, i64, i16)> = sqlx::query_as(
        "SELECT destination, type, version, partition FROM event_log ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let partition = store::log::partition_of(16, "order", "LOG-1");
    assert_eq!(
        logged,
        [
            ("kafka".into(), "order.created".into(), 1, partition),
            ("kafka".into(), "order.updated".into(), 2, partition),
        ]
    );
}

//! The batch save (ingestion's) writes exactly what one save per order
//! writes: the same rows, history, events and views.

use domain::{OrderFull, OrderId, ValidOrder};
use serde_json::Value;
use store::{Precondition, SaveContext, Store};

fn order(id: &str, status: &str, price: f64) -> ValidOrder {
    let full: OrderFull =
        serde_json::from_value(testkit::sample_order_with(id, status, price)).unwrap();
    full.validate(Some(&OrderId::parse(id).unwrap())).unwrap()
}

/// Everything a save writes, without ids and times.
async fn written(pool: &sqlx::PgPool) -> Value {
    sqlx::query_scalar(
        "SELECT json_build_object(
           'orders', (SELECT json_agg(json_build_object('id', id, 'status', status,
                        'price', price, 'version', version) ORDER BY id) FROM orders),
           'items', (SELECT json_agg(json_build_object('o', order_id, 'p', position,
                        'product', product_id, 'price', price) ORDER BY order_id, position)
                     FROM order_items),
           'payments', (SELECT json_agg(json_build_object('o', order_id, 'p', position,
                        'sum', sum, 'type', type) ORDER BY order_id, position) FROM order_payments),
           'history', (SELECT json_agg(json_build_object('o', order_id, 'type', type,
                        'old', old_value, 'value', value, 'version', version, 'user', user_id)
                        ORDER BY order_id, version, type) FROM order_history),
           'outbox', (SELECT json_agg(json_build_object('key', aggregateid, 'to', destination,
                        'type', type, 'version', version,
                        'status', payload -> 'order' -> 'status')
                        ORDER BY aggregateid, version, destination, type) FROM outbox))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_batch_save_writes_what_one_save_per_order_writes() {
    let (one_by_one, batched) = (testkit::database().await, testkit::database().await);
    let ctx = SaveContext {
        user_id: "ingest".into(),
        traceparent: None,
    };
    let before = [order("A-1", "new", 10.0), order("A-2", "new", 20.0)];
    let batch = [
        order("A-1", "paid", 12.5),
        order("A-2", "new", 20.0),
        order("A-3", "new", 30.0),
    ];
    let a = Store::new(one_by_one.pool.clone());
    for o in before.iter().chain(&batch) {
        a.save_order(o, Precondition::None, &ctx).await.unwrap();
    }
    let b = Store::new(batched.pool.clone());
    for o in &before {
        b.save_order(o, Precondition::None, &ctx).await.unwrap();
    }
    let mut tx = batched.pool.begin().await.unwrap();
    let refs: Vec<&ValidOrder> = batch.iter().collect();
    let saved = b.save_orders_in(&mut tx, &refs, &ctx).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(
        written(&one_by_one.pool).await,
        written(&batched.pool).await
    );
    let ids: Vec<&str> = saved
        .iter()
        .map(|s| s.view.full.order.id.as_str())
        .collect();
    assert_eq!(ids, ["A-1", "A-2", "A-3"], "in the order given");
    assert_eq!(
        saved
            .iter()
            .map(|s| (s.view.version, s.created))
            .collect::<Vec<_>>(),
        [(2, false), (2, false), (1, true)]
    );
    for s in &saved {
        let read = b
            .get_order(&OrderId::parse(&s.view.full.order.id).unwrap())
            .await
            .unwrap();
        assert_eq!(s.view, read, "the answered view is the stored one");
        assert!(!s.queued.is_empty());
    }
    // A batch that names an order twice is refused whole.
    let mut tx = batched.pool.begin().await.unwrap();
    let twice = [&batch[0], &batch[0]];
    assert!(b.save_orders_in(&mut tx, &twice, &ctx).await.is_err());
}

/// A single save reads its order back with a statement PostgreSQL plans
/// once per connection: planning it on every save was two thirds of the
/// read-back's cost in the saga benchmark.
#[tokio::test]
async fn a_single_save_reads_its_order_back_with_a_reused_plan() {
    let db = testkit::database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let store = Store::new(pool.clone());
    let ctx = SaveContext {
        user_id: "test".into(),
        traceparent: None,
    };
    for n in 0..8 {
        let o = order(&format!("P-{n}"), "new", 10.0);
        store
            .save_order(&o, Precondition::None, &ctx)
            .await
            .unwrap();
    }
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements
         WHERE statement LIKE '%json_agg(h ORDER BY h.id)%'
           AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        generic >= 3 && custom <= 5,
        "the read-back was planned {custom} times for 8 saves ({generic} generic)"
    );
}

//! The saga over real PostgreSQL with the PostgreSQL transport, three
//! databases (orders, inventory, payments) and the notifier, every relay
//! driven step by step: outcomes, conservation of stock and money, the
//! state chain, one notification per outcome, deadlines and replays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use domain::{Checkout, Destination, OrderFull, OrderId};
use inbox::local::LocalSink;
use inbox::{ConsumerMetrics, Inbox, Incoming, Verdict};
use relay::{Controls, LogEngine, ProtectionConfig, RelayMetrics, ServiceConfig, SinkGuard};
use rust_decimal::Decimal;
use saga::{Kind, Line, SagaMessage, Topic};
use sink::signing::{Keyring, Signing};
use sqlx::PgPool;
use store::saga::{SagaConfig, SagaRoute};
use store::{SaveContext, Store};
use tokio_util::sync::CancellationToken;
use worker::{Backoff, BreakerConfig, SystemClock};

fn metrics() -> ConsumerMetrics {
    ConsumerMetrics::register(&prometheus::Registry::new()).unwrap()
}

/// A relay's engine for `destination`, signing what it delivers.
fn engine(store: &Store, destination: &str, sink: Arc<dyn sink::Sink>) -> Arc<LogEngine> {
    let figures = RelayMetrics::new().destination(destination);
    let guard = Arc::new(SinkGuard::new(
        Arc::new(Signing::new(sink, keys()).endorsing(
            Topic::ReserveCommands.as_str(),
            Topic::PaymentCommands.as_str(),
        )),
        ProtectionConfig {
            max_in_flight: 64,
            rate_per_second: None,
            breaker: BreakerConfig {
                failure_threshold: 1000,
                cool_down: Duration::from_secs(60),
            },
        },
        Arc::new(SystemClock),
        figures.clone(),
    ));
    let service = ServiceConfig {
        relay_id: "saga-test".into(),
        batch_size: 100,
        claim_lanes: 1,
        lease: Duration::from_secs(30),
        max_attempts: 5,
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        poll_interval: Duration::from_secs(60),
        rescue_interval: Duration::from_secs(60),
        retention: Duration::from_secs(86_400),
        idempotency_key_ttl: Duration::from_secs(86_400),
        inbox_retention: Duration::from_secs(86_400),
        retention_interval: Duration::from_secs(60),
        backlog_interval: Duration::from_secs(60),
        in_doubt: Duration::from_secs(30),
    };
    let destination = destination.parse::<Destination>().unwrap();
    let controls = Controls::new(destination, guard, service.batch_size);
    LogEngine::new(store.clone(), Arc::new(controls), service, figures)
}

/// A key for every saga stream: every message in these tests travels
/// signed, as the chart runs it.
fn keys() -> Keyring {
    saga::messages::KEY_NAMES
        .iter()
        .map(|name| {
            format!(
                "{name}={}-0123456789abcdef0123456789abcdef",
                name.replace('@', "-")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .unwrap()
}

/// The three databases and every relay between them.
struct Platform {
    orders: Store,
    inventory: PgPool,
    payments: PgPool,
    notifier: Arc<notifier::Notifier>,
    /// (name, engine), in the order a pump drives them.
    engines: Vec<(&'static str, Arc<LogEngine>)>,
}

impl Platform {
    async fn new(step_timeout: Duration) -> Self {
        let orders = testkit::database().await.pool;
        let orders = Store::new(orders).with_saga(SagaConfig {
            route: Some(SagaRoute::Local),
            step_timeout,
        });
        let inventory = testkit::unmigrated_database().await.pool;
        inventory::migrate(&inventory).await.unwrap();
        let payments = testkit::unmigrated_database().await.pool;
        payments::migrate(&payments).await.unwrap();
        let notifier = Arc::new(
            notifier::Notifier::new(None, metrics())
                .unwrap()
                .with_keys(keys()),
        );
        let inventory_store = Store::new(inventory.clone());
        let payments_store = Store::new(payments.clone());
        let payments_sink = || {
            Arc::new(LocalSink::new(Inbox::new(
                payments.clone(),
                payments::CONSUMER,
                payments::Payments::new(SagaRoute::Local).with_keys(keys()),
                metrics(),
            ))) as Arc<dyn sink::Sink>
        };
        let saga_sink = || {
            Arc::new(LocalSink::new(Inbox::new(
                orders.pool().clone(),
                orchestrator::CONSUMER,
                orchestrator::Orchestrator::new(orders.clone()).with_keys(keys()),
                metrics(),
            ))) as Arc<dyn sink::Sink>
        };
        let engines = vec![
            (
                "inventory",
                engine(
                    &orders,
                    "inventory",
                    Arc::new(LocalSink::new(Inbox::new(
                        inventory.clone(),
                        inventory::CONSUMER,
                        inventory::Inventory::new(SagaRoute::Local).with_keys(keys()),
                        metrics(),
                    ))),
                ),
            ),
            ("payments", engine(&orders, "payments", payments_sink())),
            (
                "notifier",
                engine(
                    &orders,
                    "notifier",
                    Arc::new(LocalSink::new(notifier.clone())),
                ),
            ),
            (
                "inventory-answers",
                engine(&inventory_store, "saga", saga_sink()),
            ),
            (
                "inventory-to-payments",
                engine(&inventory_store, "payments", payments_sink()),
            ),
            (
                "payments-answers",
                engine(&payments_store, "saga", saga_sink()),
            ),
        ];
        Self {
            orders,
            inventory,
            payments,
            notifier,
            engines,
        }
    }

    /// Drives every relay but `skip` until none of them has an open row
    /// (a skipped relay's rows stay open).
    async fn pump_except(&self, skip: &[&str]) {
        for _ in 0..500 {
            for (name, engine) in &self.engines {
                if !skip.contains(name) {
                    engine.deliver_next(CancellationToken::new()).await.unwrap();
                }
            }
            let mut open = 0;
            for (name, _) in self.engines.iter().filter(|(n, _)| !skip.contains(n)) {
                let (pool, destination) = match *name {
                    "inventory-answers" => (&self.inventory, "saga"),
                    "inventory-to-payments" => (&self.inventory, "payments"),
                    "payments-answers" => (&self.payments, "saga"),
                    other => (self.orders.pool(), other),
                };
                open += open_rows(pool, destination).await;
            }
            if open == 0 {
                for pool in [self.orders.pool(), &self.inventory, &self.payments] {
                    let dead: Vec<(String, String, String)> =
                        sqlx::query_as("SELECT destination, type, reason FROM log_dead")
                            .fetch_all(pool)
                            .await
                            .unwrap();
                    assert_eq!(dead, [], "no message may die");
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the logs did not drain");
    }

    async fn pump(&self) {
        self.pump_except(&[]).await
    }

    async fn set_stock(&self, product: &str, available: i64) {
        inventory::stock::set_available(&self.inventory, product, available)
            .await
            .unwrap()
            .unwrap();
    }

    async fn open_account(&self, id: &str, amount: &str) {
        payments::ledger::open(&self.payments, id).await.unwrap();
        let done = payments::ledger::top_up(&self.payments, id, amount.parse().unwrap())
            .await
            .unwrap();
        assert!(matches!(done, payments::ledger::TopUp::Done(_)), "{done:?}");
    }

    async fn create(&self, id: &str, price: f64, account: &str, lines: &[(&str, i64)]) {
        let mut full: OrderFull =
            serde_json::from_value(testkit::sample_order_with(id, "new", price)).unwrap();
        full.checkout = Some(Checkout {
            account_id: account.into(),
            reserve: lines
                .iter()
                .map(|(p, q)| Line {
                    product_id: (*p).into(),
                    quantity: *q,
                })
                .collect(),
        });
        let order = full.validate(None).unwrap();
        self.orders
            .create_order(&order, None, &SaveContext::default())
            .await
            .unwrap();
    }

    /// The message id of the latest `kind` command the saga of `order` sent.
    async fn command_id(&self, order: &str, kind: Kind) -> String {
        sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT event_id FROM event_log WHERE aggregateid = $1 AND type = $2
             ORDER BY position DESC LIMIT 1",
        )
        .bind(order)
        .bind(kind.as_str())
        .fetch_one(self.orders.pool())
        .await
        .unwrap()
        .to_string()
    }

    async fn saga_state(&self, id: &str) -> (String, i64, Option<String>) {
        sqlx::query_as("SELECT state, version, reason FROM sagas WHERE order_id = $1")
            .bind(id)
            .fetch_one(self.orders.pool())
            .await
            .unwrap()
    }

    async fn chain(&self, id: &str) -> Vec<String> {
        let id = OrderId::parse(id).unwrap();
        self.orders
            .order_states(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.step)
            .collect()
    }

    /// Stock: what was set = available + sold, and nothing is held.
    async fn assert_stock_conserved(&self, initial: &BTreeMap<&str, i64>) {
        for level in inventory::stock::levels(&self.inventory).await.unwrap() {
            assert_eq!(level.reserved, 0, "{level:?} is still held");
            assert_eq!(
                level.available + level.sold,
                initial[level.product_id.as_str()],
                "{level:?}"
            );
        }
    }

    /// Money: balances + what stays charged = top-ups.
    async fn assert_money_conserved(&self) {
        let (balances, charged, topped): (Decimal, Decimal, Decimal) = sqlx::query_as(
            "SELECT (SELECT coalesce(sum(balance), 0) FROM accounts),
                    (SELECT coalesce(sum(amount), 0) FROM payments WHERE state = 'charged'),
                    (SELECT coalesce(sum(amount), 0) FROM top_ups)",
        )
        .fetch_one(&self.payments)
        .await
        .unwrap();
        assert_eq!(balances + charged, topped);
    }
}

/// Events of `destination` no cursor has passed yet.
async fn open_rows(pool: &PgPool, destination: &str) -> i64 {
    Store::new(pool.clone())
        .cursor_lag(&[destination.parse().unwrap()])
        .await
        .unwrap()
        .iter()
        .map(|c| c.events)
        .sum()
}

const COMPLETED: [&str; 6] = [
    "ORDER_CREATED",
    "RESERVE_CREATED",
    "PAYMENT_CREATED",
    "PAYMENT_COMPLETED",
    "RESERVE_COMMITTED",
    "ORDER_COMPLETED",
];
const NO_FUNDS: [&str; 6] = [
    "ORDER_CREATED",
    "RESERVE_CREATED",
    "PAYMENT_CREATED",
    "PAYMENT_FAILED",
    "RESERVE_RELEASED",
    "ORDER_CANCELLED",
];
const NO_STOCK: [&str; 3] = ["ORDER_CREATED", "RESERVE_FAILED", "ORDER_CANCELLED"];

#[tokio::test]
async fn every_saga_ends_completed_or_cancelled_and_stock_and_money_are_conserved() {
    let p = Platform::new(Duration::from_secs(30)).await;
    let initial = BTreeMap::from([("sku-a", 30), ("sku-b", 4)]);
    for (product, n) in &initial {
        p.set_stock(product, *n).await;
    }
    p.open_account("rich", "10000").await;
    p.open_account("poor", "150.49").await;
    let mut expected = BTreeMap::new();
    for i in 0..30 {
        let id = format!("S-{i}");
        // A third lack funds (150.50 > 150.49), sku-b runs out after four,
        // the rest complete.
        let (account, lines, chain): (_, Vec<(&str, i64)>, &[&str]) = match i % 3 {
            0 => ("poor", vec![("sku-a", 1)], &NO_FUNDS),
            1 => ("rich", vec![("sku-a", 1), ("sku-b", 1)], &COMPLETED),
            _ => ("rich", vec![("sku-a", 1)], &COMPLETED),
        };
        p.create(&id, 150.5, account, &lines).await;
        expected.insert(id, chain.to_vec());
    }
    p.pump().await;
    // sku-b has 4: of the ten orders asking for it, the four reserved
    // first complete, the others find none (which four is up to the
    // concurrent deliveries).
    let mut with_b = 0;
    for i in (1..30).step_by(3) {
        let id = format!("S-{i}");
        if p.chain(&id).await == NO_STOCK {
            expected.insert(id, NO_STOCK.to_vec());
        } else {
            with_b += 1;
        }
    }
    assert_eq!(with_b, 4, "sku-b is sold exactly as often as it is stocked");

    for (id, chain) in &expected {
        let (state, _, reason) = p.saga_state(id).await;
        let outcome = if chain.last() == Some(&"ORDER_COMPLETED") {
            "completed"
        } else {
            "cancelled"
        };
        assert_eq!(state, outcome, "{id}");
        assert_eq!(&p.chain(id).await, chain, "{id}");
        let order = p
            .orders
            .get_order(&OrderId::parse(id).unwrap())
            .await
            .unwrap();
        assert_eq!(order.full.order.status, outcome, "{id}: the order shows it");
        let notice = p.notifier.notification(id).expect("notified");
        assert_eq!(notice.outcome, outcome);
        if chain == &NO_FUNDS {
            assert_eq!(reason.as_deref(), Some("insufficient funds"));
            assert_eq!(notice.reason.as_deref(), Some("insufficient funds"));
        }
        if chain == &NO_STOCK {
            assert!(reason.unwrap().starts_with("not enough stock of sku-b"));
        }
    }
    assert_eq!(p.notifier.notifications().len(), expected.len());
    p.assert_stock_conserved(&initial).await;
    p.assert_money_conserved().await;
    let rich = payments::ledger::get(&p.payments, "rich")
        .await
        .unwrap()
        .unwrap();
    let completed = expected.values().filter(|c| **c == COMPLETED).count();
    assert_eq!(
        rich.balance.0,
        Decimal::from(10000) - Decimal::new(1505, 1) * Decimal::from(completed)
    );
}

#[tokio::test]
async fn a_step_without_an_answer_is_compensated_at_its_deadline() {
    let p = Platform::new(Duration::ZERO).await;
    let initial = BTreeMap::from([("sku-a", 5)]);
    p.set_stock("sku-a", 5).await;
    p.open_account("rich", "1000").await;

    // inventory never hears of the order before the deadline.
    p.create("LATE-1", 10.0, "rich", &[("sku-a", 2)]).await;
    assert_eq!(p.orders.pass_saga_deadlines(100).await.unwrap(), 1);
    let (state, ..) = p.saga_state("LATE-1").await;
    assert_eq!(state, "compensating");
    // Now its reservation and its release arrive, in that order: the
    // reservation is made, then released; the late StockReserved changes
    // nothing. Payments would charge on it, so the refund went out too: its
    // tombstone refuses that charge.
    p.pump().await;
    let (state, _, reason) = p.saga_state("LATE-1").await;
    assert_eq!(state, "cancelled");
    assert_eq!(reason.as_deref(), Some("inventory did not answer in time"));
    assert_eq!(
        p.chain("LATE-1").await,
        [
            "ORDER_CREATED",
            "DEADLINE_PASSED",
            "RESERVE_RELEASED",
            "PAYMENT_REFUNDED",
            "ORDER_CANCELLED"
        ]
    );
    let payment: (String,) = sqlx::query_as("SELECT state FROM payments WHERE order_id = 'LATE-1'")
        .fetch_one(&p.payments)
        .await
        .unwrap();
    assert_eq!(payment.0, "refunded", "the tombstone, charged nothing");

    // payments never hears of the charge before the deadline: the refund
    // and the release go out together.
    p.create("LATE-2", 10.0, "rich", &[("sku-a", 1)]).await;
    p.pump_except(&["payments", "inventory-to-payments"]).await;
    assert_eq!(p.saga_state("LATE-2").await.0, "reserved");
    assert_eq!(p.orders.pass_saga_deadlines(100).await.unwrap(), 1);
    p.pump().await;
    assert_eq!(p.saga_state("LATE-2").await.0, "cancelled");
    let chain = p.chain("LATE-2").await;
    assert_eq!(
        chain[..4],
        [
            "ORDER_CREATED",
            "RESERVE_CREATED",
            "PAYMENT_CREATED",
            "DEADLINE_PASSED"
        ]
    );
    assert_eq!(chain.last().map(String::as_str), Some("ORDER_CANCELLED"));
    assert!(chain.contains(&"PAYMENT_REFUNDED".to_owned()));
    assert!(chain.contains(&"RESERVE_RELEASED".to_owned()));
    assert_eq!(
        p.notifier.notification("LATE-2").unwrap().outcome,
        "cancelled"
    );

    p.assert_stock_conserved(&initial).await;
    p.assert_money_conserved().await;
    // Nothing is overdue any more.
    assert_eq!(p.orders.pass_saga_deadlines(100).await.unwrap(), 0);
}

fn incoming(id: &str, message: &SagaMessage) -> Incoming {
    Incoming {
        id: Some(id.into()),
        payload: serde_json::to_vec(message).unwrap(),
        origin: "test".into(),
        signature: None,
    }
}

#[tokio::test]
async fn a_release_that_overtakes_its_reservation_leaves_nothing_held() {
    let p = Platform::new(Duration::from_secs(30)).await;
    p.set_stock("sku-a", 3).await;
    let inventory = Inbox::new(
        p.inventory.clone(),
        inventory::CONSUMER,
        inventory::Inventory::new(SagaRoute::Local),
        metrics(),
    );
    let release = SagaMessage::new(Kind::ReleaseStock, "O-1");
    let reserve = SagaMessage {
        lines: vec![Line {
            product_id: "sku-a".into(),
            quantity: 2,
        }],
        ..SagaMessage::new(Kind::ReserveStock, "O-1")
    };
    let verdicts = inventory
        .process(&[incoming("m-1", &release), incoming("m-2", &reserve)])
        .await
        .unwrap();
    assert_eq!(verdicts, [Verdict::Applied, Verdict::Applied]);
    let level = inventory::stock::level(&p.inventory, "sku-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((level.available, level.reserved), (3, 0));
    let answers: Vec<String> = sqlx::query_scalar("SELECT type FROM event_log ORDER BY position")
        .fetch_all(&p.inventory)
        .await
        .unwrap();
    assert_eq!(answers, ["StockReleased", "StockFailed"]);

    // The same with payments: a refund before its charge takes nothing.
    p.open_account("acc", "100").await;
    let payments = Inbox::new(
        p.payments.clone(),
        payments::CONSUMER,
        payments::Payments::new(SagaRoute::Local),
        metrics(),
    );
    let refund = SagaMessage::new(Kind::RefundPayment, "O-1");
    let charge = SagaMessage {
        account_id: Some("acc".into()),
        ..SagaMessage::new(Kind::ChargePayment, "O-1").amount("60".parse().unwrap())
    };
    payments
        .process(&[incoming("m-3", &refund), incoming("m-4", &charge)])
        .await
        .unwrap();
    let account = payments::ledger::get(&p.payments, "acc")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account.balance.0, Decimal::from(100));
}

#[tokio::test]
async fn a_replayed_or_repeated_answer_changes_nothing() {
    let p = Platform::new(Duration::from_secs(30)).await;
    p.set_stock("sku-a", 3).await;
    p.open_account("acc", "100").await;
    p.create("R-1", 10.0, "acc", &[("sku-a", 1)]).await;
    p.pump_except(&["inventory"]).await;
    let saga = Inbox::new(
        p.orders.pool().clone(),
        orchestrator::CONSUMER,
        orchestrator::Orchestrator::new(p.orders.clone()),
        metrics(),
    );
    let reserve = p.command_id("R-1", Kind::ReserveStock).await;
    let reserved = SagaMessage::new(Kind::StockReserved, "R-1").replying_to(&reserve);
    assert_eq!(
        saga.process(&[incoming("a-1", &reserved)]).await.unwrap(),
        [Verdict::Applied]
    );
    let after_first = p.saga_state("R-1").await;
    assert_eq!(after_first.0, "reserved");
    let order_version = |p: &Platform| {
        let store = p.orders.clone();
        async move {
            store
                .get_order(&OrderId::parse("R-1").unwrap())
                .await
                .unwrap()
                .version
        }
    };
    let version = order_version(&p).await;
    // The same message again: the inbox knows it.
    assert_eq!(
        saga.process(&[incoming("a-1", &reserved)]).await.unwrap(),
        [Verdict::Duplicate]
    );
    // The same answer in a new message: the state does not expect it.
    assert_eq!(
        saga.process(&[incoming("a-2", &reserved)]).await.unwrap(),
        [Verdict::Applied]
    );
    assert_eq!(p.saga_state("R-1").await, after_first);
    assert_eq!(order_version(&p).await, version);
    assert_eq!(
        p.chain("R-1").await,
        ["ORDER_CREATED", "RESERVE_CREATED", "PAYMENT_CREATED"]
    );
}

#[tokio::test]
async fn a_checkout_is_refused_on_an_existing_order_and_where_no_saga_runs() {
    let p = Platform::new(Duration::from_secs(30)).await;
    p.create("E-1", 10.0, "acc", &[("sku-a", 1)]).await;
    let mut full: OrderFull =
        serde_json::from_value(testkit::sample_order_with("E-1", "new", 10.0)).unwrap();
    full.checkout = Some(Checkout {
        account_id: "acc".into(),
        reserve: vec![Line {
            product_id: "sku-a".into(),
            quantity: 1,
        }],
    });
    let order = full.clone().validate(None).unwrap();
    let e = p
        .orders
        .save_order(&order, store::Precondition::None, &SaveContext::default())
        .await
        .unwrap_err();
    assert!(matches!(e, store::Error::CheckoutOnExisting(_)), "{e:?}");

    let no_sagas = Store::new(p.orders.pool().clone());
    full.order.id = "E-2".into();
    let e = no_sagas
        .create_order(&full.validate(None).unwrap(), None, &SaveContext::default())
        .await
        .unwrap_err();
    assert!(matches!(e, store::Error::SagasDisabled), "{e:?}");
    let sagas: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas")
        .fetch_one(p.orders.pool())
        .await
        .unwrap();
    assert_eq!(sagas, 1, "a refused checkout writes nothing");
}

#[tokio::test]
async fn the_saga_owns_its_orders_status_and_price_and_nothing_else() {
    let p = Platform::new(Duration::from_secs(30)).await;
    p.set_stock("sku-a", 5).await;
    // No such account: the charge fails and the saga ends cancelled.
    p.create("O-1", 50.0, "nobody", &[("sku-a", 1)]).await;
    for _ in 0..10 {
        p.pump().await;
    }
    assert_eq!(p.saga_state("O-1").await.0, "cancelled");
    let id = domain::OrderId::parse("O-1").unwrap();
    let ctx = SaveContext::default();
    let owned = |e: store::Error, want: &str| match e {
        store::Error::SagaOwns { field, state, .. } => {
            assert_eq!((field, state.as_str()), (want, "cancelled"));
        }
        e => panic!("{e:?}"),
    };

    let completed = domain::StatusChange {
        status: "completed".into(),
        user_id: "someone".into(),
    };
    let e = p
        .orders
        .change_status(&id, &completed, store::Precondition::None, &ctx)
        .await
        .unwrap_err();
    owned(e, "status");

    let now = p.orders.get_order(&id).await.unwrap();
    let mut full = now.full.clone();
    full.order.price = "0.01".parse().unwrap();
    let e = p
        .orders
        .save_order(
            &full.clone().validate(None).unwrap(),
            store::Precondition::None,
            &ctx,
        )
        .await
        .unwrap_err();
    owned(e, "price");

    // Ingestion's batch save refuses it the same way, as a refusal (not
    // an outage), so the inbox dead-letters it.
    let mut paid = now.full.clone();
    paid.order.status = "paid".into();
    let paid = paid.validate(None).unwrap();
    let mut tx = p.orders.pool().begin().await.unwrap();
    let e = p
        .orders
        .save_orders_in(&mut tx, &[&paid], &ctx)
        .await
        .unwrap_err();
    drop(tx);
    assert!(
        matches!(sqlx::Error::from(e), sqlx::Error::InvalidArgument(ref m) if m.contains("saga")),
    );

    // The other fields stay the client's.
    let mut moved = now.full.clone();
    moved.order.city = "Astana".into();
    let saved = p
        .orders
        .save_order(
            &moved.validate(None).unwrap(),
            store::Precondition::None,
            &ctx,
        )
        .await
        .unwrap();
    assert_eq!(saved.view.version, now.version + 1);
    let after = p.orders.get_order(&id).await.unwrap();
    assert_eq!(
        (after.full.order.status.as_str(), after.full.order.price),
        (now.full.order.status.as_str(), now.full.order.price)
    );
}

/// `message` as a broker would hand it over, signed with `keys` (unsigned
/// when they have no key for its topic).
fn signed(id: &str, message: &SagaMessage, keys: &Keyring) -> Incoming {
    let mut m = incoming(id, message);
    m.signature = keys.sign(message.kind.topic().as_str(), id, &m.payload);
    m
}

/// The class of a dead verdict, checking that its reason says `why`.
fn dead_class(verdicts: Vec<Verdict>, why: &str) -> &'static str {
    match verdicts.as_slice() {
        [Verdict::Dead(p)] => {
            assert!(p.reason.contains(why), "{p:?} does not say {why:?}");
            p.class
        }
        other => panic!("not dead: {other:?}"),
    }
}

#[tokio::test]
async fn forged_answers_are_dead_lettered_and_conservation_holds() {
    let p = Platform::new(Duration::from_secs(30)).await;
    let initial = BTreeMap::from([("sku-a", 5)]);
    p.set_stock("sku-a", 5).await;
    payments::ledger::open(&p.payments, "poor").await.unwrap();
    p.create("F-1", 250.0, "poor", &[("sku-a", 1)]).await;
    // Payments is away: the stock is reserved and the charge waits.
    p.pump_except(&["payments", "inventory-to-payments"]).await;
    assert_eq!(p.saga_state("F-1").await.0, "reserved");

    let saga = Inbox::new(
        p.orders.pool().clone(),
        orchestrator::CONSUMER,
        orchestrator::Orchestrator::new(p.orders.clone()).with_keys(keys()),
        metrics(),
    );
    // Payments charges the ReserveStock and answers it.
    let charge = p.command_id("F-1", Kind::ReserveStock).await;
    let paid = SagaMessage::new(Kind::PaymentSucceeded, "F-1")
        .amount("250".parse().unwrap())
        .replying_to(&charge);
    let wrong_key: Keyring = "payment=someone-else-0123456789abcdef0123456789"
        .parse()
        .unwrap();
    let no_keys = Keyring::default();
    for (id, message, keys, class, why) in [
        ("f-1", &paid, &no_keys, "unsigned", "no signature"),
        ("f-2", &paid, &wrong_key, "forged", "not one of its keys"),
        // Signed, as a payments that holds the key could, but not what the
        // saga asked for: another amount, no command named, or one the
        // saga never sent.
        (
            "f-3",
            &SagaMessage::new(Kind::PaymentSucceeded, "F-1")
                .amount("1".parse().unwrap())
                .replying_to(&charge),
            &keys(),
            "apply_failed",
            "the saga asked for 250",
        ),
        (
            "f-4",
            &SagaMessage::new(Kind::PaymentSucceeded, "F-1").amount("250".parse().unwrap()),
            &keys(),
            "apply_failed",
            "names no command",
        ),
        (
            "f-5",
            &paid.clone().replying_to(&uuid::Uuid::now_v7().to_string()),
            &keys(),
            "apply_failed",
            "sent no ChargePayment",
        ),
    ] {
        let verdicts = saga.process(&[signed(id, message, keys)]).await.unwrap();
        assert_eq!(dead_class(verdicts, why), class, "{id}");
        assert_eq!(
            p.saga_state("F-1").await.0,
            "reserved",
            "{id} moved the saga"
        );
    }
    // A forged StockReserved for an order still pending is refused alike.
    let reserved = SagaMessage::new(Kind::StockReserved, "F-1");
    let verdicts = saga.process(&[incoming("f-6", &reserved)]).await.unwrap();
    assert_eq!(dead_class(verdicts, "no signature"), "unsigned");

    // Payments returns: its real answer (no funds) is the one that counts.
    p.pump().await;
    assert_eq!(p.saga_state("F-1").await.0, "cancelled");
    p.assert_stock_conserved(&initial).await;
    p.assert_money_conserved().await;
}

#[tokio::test]
async fn a_forged_or_mismatched_refund_is_dead_lettered_and_moves_no_money() {
    let p = Platform::new(Duration::from_secs(30)).await;
    p.set_stock("sku-a", 5).await;
    p.open_account("acc", "100").await;
    p.create("R-9", 50.0, "acc", &[("sku-a", 1)]).await;
    p.pump().await;
    assert_eq!(p.saga_state("R-9").await.0, "completed");
    let payments = Inbox::new(
        p.payments.clone(),
        payments::CONSUMER,
        payments::Payments::new(SagaRoute::Local).with_keys(keys()),
        metrics(),
    );
    let refund = SagaMessage::new(Kind::RefundPayment, "R-9");
    let verdicts = payments.process(&[incoming("r-1", &refund)]).await.unwrap();
    assert_eq!(dead_class(verdicts, "no signature"), "unsigned");
    // Signed, but not the charge the saga made.
    let other = refund.clone().amount("49.99".parse().unwrap());
    let verdicts = payments
        .process(&[signed("r-2", &other, &keys())])
        .await
        .unwrap();
    assert_eq!(
        dead_class(verdicts, "does not match its charge"),
        "apply_failed"
    );
    let (balance, state): (Decimal, String) = sqlx::query_as(
        "SELECT a.balance, p.state FROM accounts a JOIN payments p ON p.account_id = a.account_id
         WHERE p.order_id = 'R-9'",
    )
    .fetch_one(&p.payments)
    .await
    .unwrap();
    assert_eq!(
        (balance, state.as_str()),
        ("50".parse().unwrap(), "charged")
    );
    p.assert_money_conserved().await;
}

/// Payments charges what orders-center's `ReserveStock` endorsed, never
/// what a `StockReserved` alone says: inventory holds the key of `reserve`,
/// not the key of `payment.commands`.
#[tokio::test]
async fn payments_charges_only_the_reserve_stock_that_orders_center_endorsed() {
    let p = Platform::new(Duration::from_secs(30)).await;
    let initial = BTreeMap::from([("sku-a", 5)]);
    p.set_stock("sku-a", 5).await;
    p.open_account("rich", "1000").await;
    p.create("V-1", 40.0, "rich", &[("sku-a", 1)]).await;
    p.pump_except(&["inventory-to-payments"]).await;
    assert_eq!(p.saga_state("V-1").await.0, "reserved");
    // The StockReserved inventory wrote for payments, with its voucher.
    let genuine: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM event_log WHERE destination = 'payments' AND aggregateid = 'V-1'",
    )
    .fetch_one(&p.inventory)
    .await
    .unwrap();
    let genuine: SagaMessage = serde_json::from_value(genuine).unwrap();
    let voucher = genuine
        .voucher
        .clone()
        .expect("StockReserved carries its ReserveStock");
    assert!(voucher
        .endorsement
        .as_deref()
        .unwrap_or_default()
        .starts_with("e1="));

    let payments = Inbox::new(
        p.payments.clone(),
        payments::CONSUMER,
        payments::Payments::new(SagaRoute::Local).with_keys(keys()),
        metrics(),
    );
    // What inventory's keys alone can make: the charge rewritten to 999 on
    // the same account (its body no longer what was endorsed), the
    // endorsement dropped, an endorsement of inventory's own making, no
    // voucher, and the genuine voucher on another order.
    let inventory_keys: Keyring = keys();
    let rewritten = voucher.body.replace("40", "999");
    assert_ne!(rewritten, voucher.body);
    let with = |v: Option<saga::messages::Voucher>, order: &str| SagaMessage {
        voucher: v,
        ..SagaMessage::new(Kind::StockReserved, order)
    };
    let own_endorsement = inventory_keys
        .sign("reserve.commands", &voucher.id, rewritten.as_bytes())
        .unwrap()
        .replace("v1=", "e1=");
    for (id, message, class, why) in [
        (
            "v-1",
            with(
                Some(saga::messages::Voucher {
                    body: rewritten.clone(),
                    ..voucher.clone()
                }),
                "V-1",
            ),
            "forged",
            "not endorsed",
        ),
        (
            "v-2",
            with(
                Some(saga::messages::Voucher {
                    endorsement: None,
                    ..voucher.clone()
                }),
                "V-1",
            ),
            "unsigned",
            "not endorsed",
        ),
        (
            "v-3",
            with(
                Some(saga::messages::Voucher {
                    body: rewritten.clone(),
                    endorsement: Some(own_endorsement.clone()),
                    ..voucher.clone()
                }),
                "V-1",
            ),
            "forged",
            "not endorsed",
        ),
        ("v-4", with(None, "V-1"), "invalid", "no ReserveStock"),
        (
            "v-5",
            with(Some(voucher.clone()), "V-2"),
            "invalid",
            "not the ReserveStock of V-2",
        ),
    ] {
        let verdicts = payments
            .process(&[signed(id, &message, &inventory_keys)])
            .await
            .unwrap();
        assert_eq!(dead_class(verdicts, why), class, "{id}");
    }
    let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(&p.payments)
        .await
        .unwrap();
    assert_eq!(charged, 0, "no forged voucher charged anything");

    // The genuine one charges the 40 asked for, and the saga completes.
    p.pump().await;
    assert_eq!(p.saga_state("V-1").await.0, "completed");
    p.assert_stock_conserved(&initial).await;
    p.assert_money_conserved().await;
    let balance: Decimal =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = 'rich'")
            .fetch_one(&p.payments)
            .await
            .unwrap();
    assert_eq!(balance, Decimal::from(960));
}

/// `PaymentSucceeded` and `StockReserved` travel on different topics, so
/// the charge's answer may come first: it proves the reservation, the saga
/// completes on it, and the late `StockReserved` changes nothing.
#[tokio::test]
async fn a_payment_that_overtakes_its_reservation_completes_the_saga() {
    let p = Platform::new(Duration::from_secs(30)).await;
    let initial = BTreeMap::from([("sku-a", 5)]);
    p.set_stock("sku-a", 5).await;
    p.open_account("rich", "1000").await;
    p.create("O-9", 25.0, "rich", &[("sku-a", 2)]).await;
    p.pump_except(&["inventory-answers"]).await;
    assert_eq!(p.saga_state("O-9").await.0, "completed");
    // OrderCompleted sold the reservation, with no StockReserved seen.
    let state: String = sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = 'O-9'")
        .fetch_one(&p.inventory)
        .await
        .unwrap();
    assert_eq!(state, "committed");
    let version = p.saga_state("O-9").await.1;
    p.pump().await;
    assert_eq!(
        p.saga_state("O-9").await.1,
        version,
        "the late StockReserved moved it"
    );
    assert_eq!(
        p.chain("O-9").await,
        [
            "ORDER_CREATED",
            "RESERVE_CREATED",
            "PAYMENT_CREATED",
            "PAYMENT_COMPLETED",
            "RESERVE_COMMITTED",
            "ORDER_COMPLETED"
        ]
    );
    assert_eq!(p.notifier.notification("O-9").unwrap().outcome, "completed");
    p.assert_stock_conserved(&initial).await;
    p.assert_money_conserved().await;
}

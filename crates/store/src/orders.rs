//! The order repository. A save writes the order, its lines, its history and
//! its events in the outbox in one transaction, so no destination can miss a
//! committed save.

/// The channel on which every committed write of an order row is announced
/// (migration `…10_order_changes.sql`): payload `<version> <commit time in
/// µs since the epoch> <order id>`.
pub const ORDER_CHANGED_CHANNEL: &str = "order_changed";

use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use domain::{
    history, Destination, HistoryEntry, Money, Order, OrderFull, OrderId, OrderSummary, OrderView,
    StatusChange, SyncStatus, TaskState, ValidOrder, ONEC,
};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::{outbox, Error, Result, Store};

/// What the caller requires of the order's current state before a save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// No requirement (plain PUT).
    None,
    /// The order exists at exactly this version (`If-Match: "<v>"`).
    Version(i64),
    /// The order exists at any version (`If-Match: *`).
    Exists,
    /// The order does not exist yet (`If-None-Match: *`, and every create).
    Absent,
}

/// Request facts a save records alongside the order.
#[derive(Debug, Clone, Default)]
pub struct SaveContext {
    /// Who saves; written to history rows.
    pub user_id: String,
    /// W3C `traceparent` of the saving request, stored in the outbox task.
    pub traceparent: Option<String>,
}

/// The result of a save.
#[derive(Debug, Clone)]
pub struct Saved {
    /// The order as committed, with its new version and pending sync state.
    pub view: OrderView,
    /// Whether this save created the order.
    pub created: bool,
    /// The destination of every outbox row the save wrote, one per row.
    pub queued: Vec<Destination>,
}

/// Filters of the order list. Every filter narrows; absent ones do not.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Exact status.
    pub status: Option<String>,
    /// Exact city.
    pub city: Option<String>,
    /// Orders updated at or after this instant.
    pub updated_since: Option<DateTime<Utc>>,
}

/// An opaque position in the order list.
///
/// It wraps the immutable insertion sequence of the last order returned, so a
/// page never repeats or skips an order already present when the walk began,
/// however many orders are inserted or updated meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(i64);

impl Cursor {
    const PREFIX: &'static str = "s1:";

    /// Encodes the cursor for a URL.
    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}{}", Self::PREFIX, self.0))
    }

    /// Decodes a cursor this service issued.
    pub fn decode(s: &str) -> Result<Self> {
        let raw = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| Error::InvalidCursor)?;
        std::str::from_utf8(&raw)
            .ok()
            .and_then(|t| t.strip_prefix(Self::PREFIX))
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .map(Self)
            .ok_or(Error::InvalidCursor)
    }
}

/// One page of the order list.
#[derive(Debug, Clone)]
pub struct Page {
    /// Orders in insertion order.
    pub orders: Vec<OrderSummary>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: String,
    #[sqlx(rename = "type")]
    kind: String,
    status: String,
    city: String,
    subdivision: String,
    price: Decimal,
    platform: String,
    general_id: Uuid,
    order_number: String,
    executor: String,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl OrderRow {
    fn into_order(self) -> (Order, i64) {
        let order = Order {
            id: self.id,
            kind: self.kind,
            status: self.status,
            city: self.city,
            subdivision: self.subdivision,
            price: Money(self.price),
            platform: self.platform,
            general_id: self.general_id,
            order_number: self.order_number,
            executor: self.executor,
            created_at: Some(self.created_at),
            updated_at: Some(self.updated_at),
        };
        (order, self.version)
    }
}

#[derive(sqlx::FromRow)]
struct FullRow {
    #[sqlx(flatten)]
    order: OrderRow,
    items: Json<Vec<domain::OrderItem>>,
    payments: Json<Vec<domain::Payment>>,
    history: Json<Vec<HistoryEntry>>,
    sync: Option<Json<SyncStatus>>,
}

const ORDER_COLUMNS: &str = "o.id, o.type, o.status, o.city, o.subdivision, o.price, \
     o.platform, o.general_id, o.order_number, o.executor, o.version, o.created_at, o.updated_at";

/// The 1C delivery state of the order `o` (its latest snapshot task).
const SYNC_SQL: &str = "(SELECT row_to_json(t) FROM (
                SELECT id AS task_id, version, state, attempts, last_error, updated_at
                FROM outbox WHERE destination = 'onec' AND aggregateid = o.id
                  AND type <> 'order.status_changed' -- rows of before one event per version
                ORDER BY id DESC LIMIT 1) t)";

/// The whole OrderFull of the orders `WHERE` selects, in one round trip and
/// one snapshot, so a read never mixes lines of two versions.
fn load_sql(filter: &str) -> String {
    format!(
        "SELECT {ORDER_COLUMNS},
            COALESCE((SELECT json_agg(i ORDER BY i.position) FROM order_items i
                      WHERE i.order_id = o.id), '[]') AS items,
            COALESCE((SELECT json_agg(p ORDER BY p.position) FROM order_payments p
                      WHERE p.order_id = o.id), '[]') AS payments,
            COALESCE((SELECT json_agg(h ORDER BY h.id) FROM order_history h
                      WHERE h.order_id = o.id), '[]') AS history,
            {SYNC_SQL} AS sync
         FROM orders o WHERE {filter}"
    )
}

static LOAD_SQL: LazyLock<String> = LazyLock::new(|| load_sql("o.id = $1"));
static LOAD_MANY_SQL: LazyLock<String> = LazyLock::new(|| load_sql("o.id = ANY($1)"));

impl FullRow {
    fn into_view(self) -> OrderView {
        let (order, version) = self.order.into_order();
        OrderView {
            full: OrderFull {
                order,
                items: self.items.0,
                payments: self.payments.0,
                history: self.history.0,
                checkout: None,
            },
            version,
            sync: self.sync.map(|s| s.0),
        }
    }
}

/// The orders of `ids` that exist, in no particular order.
///
/// One id is read with `o.id = $1`: PostgreSQL plans that form once per
/// connection and reuses the plan, where `= ANY($1)` is planned again on
/// every call (a generic plan for an array of unknown length looks dearer),
/// and planning was two thirds of this read's cost for single saves.
async fn load_many(conn: &mut PgConnection, ids: &[&str]) -> Result<Vec<OrderView>> {
    if let [id] = ids {
        let row: Option<FullRow> = sqlx::query_as(LOAD_SQL.as_str())
            .bind(id)
            .fetch_optional(conn)
            .await?;
        return Ok(row.into_iter().map(FullRow::into_view).collect());
    }
    let rows: Vec<FullRow> = sqlx::query_as(LOAD_MANY_SQL.as_str())
        .bind(ids)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(FullRow::into_view).collect())
}

pub(crate) async fn load(conn: &mut PgConnection, id: &OrderId) -> Result<Option<OrderView>> {
    Ok(load_many(conn, &[id.as_str()]).await?.pop())
}

struct Current {
    version: i64,
    tracked: history::Tracked,
}

async fn lock(conn: &mut PgConnection, id: &OrderId) -> Result<Option<Current>> {
    let row: Option<(i64, String, Decimal)> =
        sqlx::query_as("SELECT version, status, price FROM orders WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|(version, status, price)| Current {
        version,
        tracked: history::Tracked {
            status,
            price: Money(price),
        },
    }))
}

fn check(pre: Precondition, id: &OrderId, current: Option<i64>) -> Result<()> {
    let holds = match (pre, current) {
        (Precondition::None, _) => true,
        (Precondition::Exists, c) => c.is_some(),
        (Precondition::Absent, c) => c.is_none(),
        (Precondition::Version(v), c) => c == Some(v),
    };
    if holds {
        Ok(())
    } else {
        Err(Error::PreconditionFailed {
            id: id.clone(),
            required: pre,
            current,
        })
    }
}

/// Binds `$1`..`$10` of the order row statements: id, then the header fields.
fn bind_order<'q>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    o: &'q Order,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    q.bind(&o.id)
        .bind(&o.kind)
        .bind(&o.status)
        .bind(&o.city)
        .bind(&o.subdivision)
        .bind(o.price.0)
        .bind(&o.platform)
        .bind(o.general_id)
        .bind(&o.order_number)
        .bind(&o.executor)
}

/// Writes one save inside the caller's transaction: order row, lines, history,
/// the save's events in the outbox and the wake-up. Any failure aborts the whole transaction.
pub(crate) async fn save_in(
    conn: &mut PgConnection,
    store: &Store,
    order: &ValidOrder,
    pre: Precondition,
    ctx: &SaveContext,
) -> Result<Saved> {
    let id = order.id();
    let o = &order.get().order;
    // A concurrent first save of the same id can win the insert between our
    // lookup and our insert; then its row exists and a second lookup locks it.
    let mut attempts = 0;
    let (before, created) = loop {
        attempts += 1;
        let current = lock(conn, id).await?;
        check(pre, id, current.as_ref().map(|c| c.version))?;
        if let Some(current) = current {
            bind_order(
                sqlx::query(
                    "UPDATE orders SET type = $2, status = $3, city = $4, subdivision = $5,
                         price = $6, platform = $7, general_id = $8, order_number = $9,
                         executor = $10, version = version + 1, updated_at = now()
                     WHERE id = $1",
                ),
                o,
            )
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "WITH items AS (DELETE FROM order_items WHERE order_id = $1)
                 DELETE FROM order_payments WHERE order_id = $1",
            )
            .bind(id.as_str())
            .execute(&mut *conn)
            .await?;
            break (Some(current), false);
        }
        let inserted = bind_order(
            sqlx::query(
                "INSERT INTO orders (id, type, status, city, subdivision, price, platform,
                                     general_id, order_number, executor, version)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1)
                 ON CONFLICT (id) DO NOTHING",
            ),
            o,
        )
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 1 {
            break (None, true);
        }
        if attempts >= 2 {
            return Err(Error::Invariant(format!(
                "order {id} conflicted on insert but cannot be locked; orders are never deleted"
            )));
        }
    };

    if let Some(b) = &before {
        let after = history::Tracked {
            status: o.status.clone(),
            price: o.price,
        };
        refuse_saga_fields(conn, &[(id.as_str(), &b.tracked, &after)]).await?;
    }
    insert_lines(conn, &[order]).await?;
    let version = before.as_ref().map_or(1, |b| b.version + 1);
    // The saga a checkout asks for is started by the caller
    // (`checkout.rs`): the order knows nothing of sagas.
    if order.get().checkout.is_some() && !created {
        return Err(Error::CheckoutOnExisting(id.clone()));
    }
    let after = history::Tracked {
        status: o.status.clone(),
        price: o.price,
    };
    let before = before.map(|b| b.tracked);
    record_save(conn, store, id, version, before, after, ctx, created).await
}

/// What every save ends with, once the order row is written: the history of
/// what changed, the save's events in the outbox, and the view to answer.
#[allow(clippy::too_many_arguments)]
async fn record_save(
    conn: &mut PgConnection,
    store: &Store,
    id: &OrderId,
    version: i64,
    before: Option<history::Tracked>,
    after: history::Tracked,
    ctx: &SaveContext,
    created: bool,
) -> Result<Saved> {
    let record = SaveRecord {
        id,
        version,
        before,
        after,
        created,
    };
    let mut saved = record_saves(conn, store, ctx, vec![record]).await?;
    Ok(saved.pop().expect("one record, one save"))
}

/// One order row just written by a save.
struct SaveRecord<'a> {
    id: &'a OrderId,
    version: i64,
    before: Option<history::Tracked>,
    after: history::Tracked,
    created: bool,
}

/// [`record_save`] for several orders (each at most once) in set-based
/// statements; the saves come back in the order of `records`.
async fn record_saves(
    conn: &mut PgConnection,
    store: &Store,
    ctx: &SaveContext,
    records: Vec<SaveRecord<'_>>,
) -> Result<Vec<Saved>> {
    let changes: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r.id,
                r.version,
                history::changes(r.before.as_ref(), &r.after),
            )
        })
        .collect();
    insert_history(conn, ctx, &changes).await?;
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut views: std::collections::HashMap<String, OrderView> = load_many(conn, &ids)
        .await?
        .into_iter()
        .map(|v| (v.full.order.id.clone(), v))
        .collect();
    let mut saved = Vec::with_capacity(records.len());
    for r in &records {
        let view = views
            .remove(r.id.as_str())
            .ok_or_else(|| Error::NotFound(r.id.clone()))?;
        saved.push((r, view));
    }
    let events: Vec<outbox::SaveEvents<'_>> = saved
        .iter()
        .map(|(r, view)| outbox::SaveEvents {
            order: r.id,
            version: view.version,
            snapshot: &view.full,
            previous_status: r.before.as_ref().map(|b| b.status.as_str()),
            traceparent: ctx.traceparent.as_deref(),
        })
        .collect();
    let mut by_order: std::collections::HashMap<String, Vec<outbox::Enqueued>> =
        std::collections::HashMap::new();
    for e in outbox::enqueue(conn, store.routes(), &events).await? {
        by_order.entry(e.order.clone()).or_default().push(e);
    }
    Ok(saved
        .into_iter()
        .map(|(r, mut view)| {
            let mine = by_order.remove(r.id.as_str()).unwrap_or_default();
            view.sync = mine
                .iter()
                .find(|e| e.destination.as_str() == ONEC)
                .and_then(|task| task.id.map(|id| (task, id)))
                .map(|(task, task_id)| SyncStatus {
                    task_id,
                    version: view.version,
                    state: TaskState::Pending,
                    attempts: task.attempts,
                    last_error: task.last_error.clone(),
                    updated_at: task.updated_at,
                });
            Saved {
                view,
                created: r.created,
                queued: mine.into_iter().map(|e| e.destination).collect(),
            }
        })
        .collect())
}

/// Saves several new or existing orders, each at most once, in the
/// caller's transaction with set-based statements: what [`save_in`] does
/// for one order with no precondition and no checkout, for a batch of
/// ingested orders. The saves come back in the order given.
pub(crate) async fn save_many_in(
    conn: &mut PgConnection,
    store: &Store,
    orders: &[&ValidOrder],
    ctx: &SaveContext,
) -> Result<Vec<Saved>> {
    if let Some(o) = orders.iter().find(|o| o.get().checkout.is_some()) {
        return Err(Error::Invariant(format!(
            "a batch save of {} carries a checkout",
            o.id()
        )));
    }
    let ids: Vec<&str> = orders.iter().map(|o| o.id().as_str()).collect();
    if ids.iter().collect::<std::collections::HashSet<_>>().len() != ids.len() {
        return Err(Error::Invariant("a batch save names an order twice".into()));
    }
    // Locked in id order, as every batch does, so two batches never deadlock.
    let current: std::collections::HashMap<String, Current> =
        sqlx::query_as::<_, (String, i64, String, Decimal)>(
            "SELECT id, version, status, price FROM orders WHERE id = ANY($1)
             ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(id, version, status, price)| {
            let tracked = history::Tracked {
                status,
                price: Money(price),
            };
            (id, Current { version, tracked })
        })
        .collect();
    let (existing, fresh): (Vec<&ValidOrder>, Vec<&ValidOrder>) = orders
        .iter()
        .partition(|o| current.contains_key(o.id().as_str()));
    let afters: Vec<history::Tracked> = existing
        .iter()
        .map(|o| history::Tracked {
            status: o.get().order.status.clone(),
            price: o.get().order.price,
        })
        .collect();
    let changes: Vec<_> = existing
        .iter()
        .zip(&afters)
        .map(|(o, after)| (o.id().as_str(), &current[o.id().as_str()].tracked, after))
        .collect();
    refuse_saga_fields(conn, &changes).await?;
    if !existing.is_empty() {
        let c = OrderColumns::of(&existing);
        c.bind(sqlx::query_scalar::<_, String>(
            "UPDATE orders o SET type = u.type, status = u.status, city = u.city,
                 subdivision = u.subdivision, price = u.price, platform = u.platform,
                 general_id = u.general_id, order_number = u.order_number,
                 executor = u.executor, version = o.version + 1, updated_at = now()
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::numeric[], $7::text[], $8::uuid[], $9::text[], $10::text[])
                  AS u(id, type, status, city, subdivision, price, platform, general_id,
                       order_number, executor)
             WHERE o.id = u.id
             RETURNING o.id",
        ))
        .fetch_all(&mut *conn)
        .await?;
        sqlx::query(
            "WITH items AS (DELETE FROM order_items WHERE order_id = ANY($1))
             DELETE FROM order_payments WHERE order_id = ANY($1)",
        )
        .bind(&c.id)
        .execute(&mut *conn)
        .await?;
    }
    let mut inserted = std::collections::HashSet::new();
    if !fresh.is_empty() {
        let c = OrderColumns::of(&fresh);
        inserted = c
            .bind(sqlx::query_scalar::<_, String>(
                "INSERT INTO orders (id, type, status, city, subdivision, price, platform,
                                 general_id, order_number, executor, version)
             SELECT u.*, 1
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::numeric[], $7::text[], $8::uuid[], $9::text[], $10::text[])
             AS u
             ON CONFLICT (id) DO NOTHING
             RETURNING id",
            ))
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    }
    // An order created by someone else since the lock: saved on its own,
    // as a replace, below.
    let (written, raced): (Vec<&ValidOrder>, Vec<&ValidOrder>) = orders
        .iter()
        .partition(|o| current.contains_key(o.id().as_str()) || inserted.contains(o.id().as_str()));
    insert_lines(conn, &written).await?;
    let records = written
        .iter()
        .map(|o| {
            let before = current.get(o.id().as_str()).map(|c| c.tracked.clone());
            let order = &o.get().order;
            SaveRecord {
                id: o.id(),
                version: current.get(o.id().as_str()).map_or(1, |c| c.version + 1),
                created: before.is_none(),
                before,
                after: history::Tracked {
                    status: order.status.clone(),
                    price: order.price,
                },
            }
        })
        .collect();
    let mut saved = record_saves(conn, store, ctx, records).await?;
    for o in raced {
        saved.push(save_in(conn, store, o, Precondition::None, ctx).await?);
    }
    let position: std::collections::HashMap<&str, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    saved.sort_by_key(|s| position[s.view.full.order.id.as_str()]);
    Ok(saved)
}

/// The header columns of several orders, as arrays for `unnest`.
struct OrderColumns<'a> {
    id: Vec<&'a str>,
    kind: Vec<&'a str>,
    status: Vec<&'a str>,
    city: Vec<&'a str>,
    subdivision: Vec<&'a str>,
    price: Vec<Decimal>,
    platform: Vec<&'a str>,
    general_id: Vec<Uuid>,
    order_number: Vec<&'a str>,
    executor: Vec<&'a str>,
}

impl<'a> OrderColumns<'a> {
    /// Binds `$1`..`$10` of the `unnest` statements: id, then the header.
    fn bind<'q>(
        &'q self,
        q: sqlx::query::QueryScalar<'q, Postgres, String, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, Postgres, String, sqlx::postgres::PgArguments> {
        q.bind(&self.id)
            .bind(&self.kind)
            .bind(&self.status)
            .bind(&self.city)
            .bind(&self.subdivision)
            .bind(&self.price)
            .bind(&self.platform)
            .bind(&self.general_id)
            .bind(&self.order_number)
            .bind(&self.executor)
    }

    fn of(orders: &[&'a ValidOrder]) -> Self {
        let headers: Vec<&'a Order> = orders.iter().map(|o| &o.get().order).collect();
        let col = |f: fn(&'a Order) -> &'a str| headers.iter().map(|o| f(o)).collect();
        Self {
            id: orders.iter().map(|o| o.id().as_str()).collect(),
            kind: col(|o| &o.kind),
            status: col(|o| &o.status),
            city: col(|o| &o.city),
            subdivision: col(|o| &o.subdivision),
            price: headers.iter().map(|o| o.price.0).collect(),
            platform: col(|o| &o.platform),
            general_id: headers.iter().map(|o| o.general_id).collect(),
            order_number: col(|o| &o.order_number),
            executor: col(|o| &o.executor),
        }
    }
}

/// One kind of line of every order: `(order id, position, line)`.
fn lines<'a, T>(
    orders: &[&'a ValidOrder],
    of: fn(&'a OrderFull) -> &'a Vec<T>,
) -> Vec<(&'a str, i32, &'a T)> {
    orders
        .iter()
        .flat_map(|o| {
            let id = o.id().as_str();
            of(o.get())
                .iter()
                .zip(0..)
                .map(move |(line, p)| (id, p, line))
        })
        .collect()
}

/// The items and payments of `orders`, in one statement each.
async fn insert_lines(conn: &mut PgConnection, orders: &[&ValidOrder]) -> Result<()> {
    let items = lines(orders, |f| &f.items);
    if !items.is_empty() {
        let col = |f: fn(&domain::OrderItem) -> &str| -> Vec<&str> {
            items.iter().map(|(_, _, i)| f(i)).collect()
        };
        let num = |f: fn(&domain::OrderItem) -> Money| -> Vec<Decimal> {
            items.iter().map(|(_, _, i)| f(i).0).collect()
        };
        sqlx::query(
            "INSERT INTO order_items (order_id, position, product_id, external_id, status,
                 base_price, price, earned_bonuses, spent_bonuses, gift, owner_id,
                 delivery_id, shop_assistant, warehouse)
             SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[],
                 $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[], $10::bool[],
                 $11::text[], $12::text[], $13::text[], $14::text[])",
        )
        .bind(items.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
        .bind(items.iter().map(|(_, p, _)| *p).collect::<Vec<_>>())
        .bind(col(|i| &i.product_id))
        .bind(col(|i| &i.external_id))
        .bind(col(|i| &i.status))
        .bind(num(|i| i.base_price))
        .bind(num(|i| i.price))
        .bind(num(|i| i.earned_bonuses))
        .bind(num(|i| i.spent_bonuses))
        .bind(items.iter().map(|(_, _, i)| i.gift).collect::<Vec<_>>())
        .bind(col(|i| &i.owner_id))
        .bind(col(|i| &i.delivery_id))
        .bind(col(|i| &i.shop_assistant))
        .bind(col(|i| &i.warehouse))
        .execute(&mut *conn)
        .await?;
    }
    let pays = lines(orders, |f| &f.payments);
    if !pays.is_empty() {
        let col = |f: fn(&domain::Payment) -> &str| -> Vec<&str> {
            pays.iter().map(|(_, _, p)| f(p)).collect()
        };
        let json = |v: Option<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
        sqlx::query(
            "INSERT INTO order_payments (order_id, position, id, type, sum, payed, info,
                 credit_data, contract_number, card_payment_data, external_id)
             SELECT u.order_id, u.position, u.id, u.type, u.sum, u.payed, u.info,
                    NULLIF(u.credit_data, 'null'::jsonb), u.contract_number,
                    NULLIF(u.card_payment_data, 'null'::jsonb), u.external_id
             FROM UNNEST($1::text[], $2::int4[], $3::uuid[], $4::text[], $5::numeric[],
                 $6::bool[], $7::text[], $8::jsonb[], $9::text[], $10::jsonb[], $11::text[])
                 AS u(order_id, position, id, type, sum, payed, info, credit_data,
                      contract_number, card_payment_data, external_id)",
        )
        .bind(pays.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
        .bind(pays.iter().map(|(_, n, _)| *n).collect::<Vec<_>>())
        .bind(pays.iter().map(|(_, _, p)| p.id).collect::<Vec<_>>())
        .bind(
            pays.iter()
                .map(|(_, _, p)| p.kind.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(pays.iter().map(|(_, _, p)| p.sum.0).collect::<Vec<_>>())
        .bind(pays.iter().map(|(_, _, p)| p.payed).collect::<Vec<_>>())
        .bind(col(|p| &p.info))
        .bind(
            pays.iter()
                .map(|(_, _, p)| json(p.credit_data.as_ref().map(|c| serde_json::json!(c))))
                .collect::<Vec<_>>(),
        )
        .bind(col(|p| &p.contract_number))
        .bind(
            pays.iter()
                .map(|(_, _, p)| json(p.card_payment_data.as_ref().map(|c| serde_json::json!(c))))
                .collect::<Vec<_>>(),
        )
        .bind(col(|p| &p.external_id))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The history rows of several saves: `(order, version, changes)` each.
async fn insert_history(
    conn: &mut PgConnection,
    ctx: &SaveContext,
    saves: &[(&OrderId, i64, Vec<history::Change>)],
) -> Result<()> {
    let rows: Vec<(&str, i64, &history::Change)> = saves
        .iter()
        .flat_map(|(id, version, changes)| changes.iter().map(move |c| (id.as_str(), *version, c)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO order_history (order_id, type, type_id, old_value, value, user_id, version)
         SELECT u.order_id, u.type, u.type_id, NULLIF(u.old_value, 'null'::jsonb), u.value, $1,
                u.version
         FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::int4[], $6::jsonb[], $7::jsonb[])
             AS u(order_id, version, type, type_id, old_value, value)",
    )
    .bind(&ctx.user_id)
    .bind(rows.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, v, _)| *v).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|(_, _, c)| c.kind.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(_, _, c)| c.kind.type_id())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(_, _, c)| c.old_value.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(_, _, c)| c.value.clone())
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Refuses (with [`Error::SagaOwns`]) any of `changes` (order, before,
/// after) that moves the status or the price of an order that has a saga:
/// those are the saga's, while it runs and after it ended.
async fn refuse_saga_fields(
    conn: &mut PgConnection,
    changes: &[(&str, &history::Tracked, &history::Tracked)],
) -> Result<()> {
    let moved: Vec<&str> = changes
        .iter()
        .filter(|(_, before, after)| before.status != after.status || before.price != after.price)
        .map(|(id, _, _)| *id)
        .collect();
    if moved.is_empty() {
        return Ok(());
    }
    let sagas: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, state FROM sagas WHERE order_id = ANY($1)")
            .bind(&moved)
            .fetch_all(&mut *conn)
            .await?;
    let Some((order, state)) = sagas.into_iter().next() else {
        return Ok(());
    };
    let (_, before, after) = changes
        .iter()
        .find(|(id, _, _)| *id == order)
        .expect("a saga of a moved order");
    let field = if before.status != after.status {
        "status"
    } else {
        "price"
    };
    Err(Error::SagaOwns {
        order: OrderId::parse(&order).map_err(Error::Invariant)?,
        state,
        field,
    })
}

/// Who changes an order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangedBy {
    /// A client: refused on an order its saga runs.
    Client,
    /// The order's saga.
    Saga,
}

/// Changes only the status of an existing order in the caller's
/// transaction; the rest is kept as is.
pub(crate) async fn change_status_in(
    conn: &mut PgConnection,
    store: &Store,
    id: &OrderId,
    change: &StatusChange,
    pre: Precondition,
    ctx: &SaveContext,
    by: ChangedBy,
) -> Result<Saved> {
    let current = lock(conn, id).await?;
    check(pre, id, current.as_ref().map(|c| c.version))?;
    let current = current.ok_or_else(|| Error::NotFound(id.clone()))?;
    let after = history::Tracked {
        status: change.status.clone(),
        price: current.tracked.price,
    };
    if by == ChangedBy::Client {
        refuse_saga_fields(conn, &[(id.as_str(), &current.tracked, &after)]).await?;
    }
    // Only the header row changes: the lines stay as they are, unwritten.
    sqlx::query(
        "UPDATE orders SET status = $2, version = version + 1, updated_at = now() WHERE id = $1",
    )
    .bind(id.as_str())
    .bind(&change.status)
    .execute(&mut *conn)
    .await?;
    let version = current.version + 1;
    record_save(
        conn,
        store,
        id,
        version,
        Some(current.tracked),
        after,
        ctx,
        false,
    )
    .await
}

impl Store {
    /// Changes only the status of an existing order; the rest is kept as is,
    /// and the change is saved, recorded and delivered like any other save.
    pub async fn change_status(
        &self,
        id: &OrderId,
        change: &StatusChange,
        pre: Precondition,
        ctx: &SaveContext,
    ) -> Result<Saved> {
        let mut tx = self.pool.begin().await?;
        let saved =
            change_status_in(&mut tx, self, id, change, pre, ctx, ChangedBy::Client).await?;
        tx.commit().await?;
        Ok(saved)
    }

    /// The order with its items, payments, history, version and sync state.
    pub async fn get_order(&self, id: &OrderId) -> Result<OrderView> {
        let mut conn = self.pool.acquire().await?;
        load(&mut conn, id)
            .await?
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// The orders of `ids` that exist, in no particular order, each read
    /// whole in one snapshot: the cache's warm-up.
    pub async fn get_orders(&self, ids: &[String]) -> Result<Vec<OrderView>> {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        load_many(&mut *self.pool.acquire().await?, &ids).await
    }

    /// The ids of the `limit` most recently updated orders, newest first.
    /// A top-N sort over the table: run once at start, it needs no index
    /// that every save would have to write.
    pub async fn recently_updated(&self, limit: i64) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM orders ORDER BY updated_at DESC, id LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The 1C delivery state of the order's latest version alone: what a
    /// cached order may have to refresh while that version is in flight.
    pub async fn order_sync(&self, id: &OrderId) -> Result<Option<SyncStatus>> {
        let row: Option<(Option<Json<SyncStatus>>,)> =
            sqlx::query_as(&format!("SELECT {SYNC_SQL} FROM orders o WHERE o.id = $1"))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        let row = row.ok_or_else(|| Error::NotFound(id.clone()))?;
        Ok(row.0.map(|s| s.0))
    }

    /// Saves several orders, each at most once, with no precondition and
    /// no checkout, inside the caller's transaction: ingestion's batches.
    /// Every order gets exactly what [`Store::save_order`] would write
    /// (row, lines, history, events); the saves come back in that order.
    pub async fn save_orders_in(
        &self,
        conn: &mut PgConnection,
        orders: &[&ValidOrder],
        ctx: &SaveContext,
    ) -> Result<Vec<Saved>> {
        save_many_in(conn, self, orders, ctx).await
    }

    /// The order's history, oldest first.
    pub async fn order_history(&self, id: &OrderId) -> Result<Vec<HistoryEntry>> {
        let row: Option<(Json<Vec<HistoryEntry>>,)> = sqlx::query_as(
            "SELECT COALESCE((SELECT json_agg(h ORDER BY h.id) FROM order_history h
                              WHERE h.order_id = o.id), '[]')
             FROM orders o WHERE o.id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.0 .0)
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// One page of orders matching `filter`, after `after`, in insertion order.
    pub async fn list_orders(
        &self,
        filter: &ListFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> Result<Page> {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "SELECT {ORDER_COLUMNS}, o.seq FROM orders o WHERE o.seq > "
        ));
        q.push_bind(after.map_or(0, |c| c.0));
        if let Some(status) = &filter.status {
            q.push(" AND o.status = ").push_bind(status);
        }
        if let Some(city) = &filter.city {
            q.push(" AND o.city = ").push_bind(city);
        }
        if let Some(since) = filter.updated_since {
            q.push(" AND o.updated_at >= ").push_bind(since);
        }
        // One extra row tells whether another page follows.
        q.push(" ORDER BY o.seq LIMIT ")
            .push_bind(i64::from(limit) + 1);

        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            order: OrderRow,
            seq: i64,
        }
        let mut rows: Vec<Row> = q.build_query_as().fetch_all(&self.pool).await?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next = more.then(|| Cursor(rows.last().map_or(0, |r| r.seq)));
        let orders = rows
            .into_iter()
            .map(|r| {
                let (order, version) = r.order.into_order();
                OrderSummary { order, version }
            })
            .collect();
        Ok(Page { orders, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_forgeries() {
        let c = Cursor(42);
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in [
            "",
            "!!",
            &URL_SAFE_NO_PAD.encode("s1:-5"),
            &URL_SAFE_NO_PAD.encode("x:5"),
        ] {
            assert!(
                matches!(Cursor::decode(bad), Err(Error::InvalidCursor)),
                "{bad}"
            );
        }
    }

    #[test]
    fn preconditions_compare_against_the_current_version() {
        let id = OrderId::parse("A").unwrap();
        for (pre, current) in [
            (Precondition::None, None),
            (Precondition::None, Some(4)),
            (Precondition::Version(3), Some(3)),
            (Precondition::Exists, Some(1)),
            (Precondition::Absent, None),
        ] {
            assert!(check(pre, &id, current).is_ok(), "{pre:?} on {current:?}");
        }
        for (pre, current) in [
            (Precondition::Version(2), Some(3)),
            (Precondition::Version(1), None),
            (Precondition::Exists, None),
            (Precondition::Absent, Some(1)),
        ] {
            assert!(
                matches!(
                    check(pre, &id, current),
                    Err(Error::PreconditionFailed { current: c, .. }) if c == current
                ),
                "{pre:?} on {current:?}"
            );
        }
    }
}

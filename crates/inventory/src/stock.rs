//! inventory's SQL. A reservation is all or nothing: the products are
//! locked in id order (so two reservations never deadlock), checked, and
//! only then decremented. Every command is idempotent by order id, and a
//! reservation that arrives after its release finds the release's
//! tombstone and holds nothing.

use saga::{Kind, Line, SagaMessage};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;

/// One product's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct StockLevel {
    /// The product.
    #[schema(example = "sku-1")]
    pub product_id: String,
    /// Free to reserve.
    pub available: i64,
    /// Held by reservations of orders still running.
    pub reserved: i64,
    /// Sold: held by completed orders.
    pub sold: i64,
}

/// One order's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reservation {
    /// The order.
    pub order_id: String,
    /// `reserved`, `committed`, `released` or `refused`.
    pub state: String,
    /// Why it was refused or released without being held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What it holds (or held).
    pub lines: Vec<Line>,
}

const LEVEL: &str = "SELECT p.product_id, p.available,
        coalesce(sum(l.quantity) FILTER (WHERE r.state = 'reserved'), 0)::bigint AS reserved,
        coalesce(sum(l.quantity) FILTER (WHERE r.state = 'committed'), 0)::bigint AS sold
     FROM products p
     LEFT JOIN reservation_lines l ON l.product_id = p.product_id
     LEFT JOIN reservations r ON r.order_id = l.order_id";

async fn state_of(
    conn: &mut PgConnection,
    order: &str,
) -> sqlx::Result<Option<(String, Option<String>)>> {
    sqlx::query_as("SELECT state, reason FROM reservations WHERE order_id = $1 FOR UPDATE")
        .bind(order)
        .fetch_optional(conn)
        .await
}

/// Reserves every line for `order`, or nothing; answers `StockReserved` or
/// `StockFailed` with the reason.
pub async fn reserve(
    conn: &mut PgConnection,
    order: &str,
    lines: &[Line],
) -> sqlx::Result<SagaMessage> {
    let answer = |kind| SagaMessage::new(kind, order);
    match state_of(conn, order).await? {
        Some((state, _)) if state == "reserved" || state == "committed" => {
            return Ok(answer(Kind::StockReserved))
        }
        Some((state, reason)) => {
            let reason = match state.as_str() {
                "released" => "the order was cancelled before its reservation arrived".into(),
                _ => reason.unwrap_or_else(|| "refused".into()),
            };
            return Ok(answer(Kind::StockFailed).because(reason));
        }
        None => {}
    }
    let mut sorted: Vec<&Line> = lines.iter().collect();
    sorted.sort_by(|a, b| a.product_id.cmp(&b.product_id));
    let ids: Vec<&str> = sorted.iter().map(|l| l.product_id.as_str()).collect();
    let stock: Vec<(String, i64)> = sqlx::query_as(
        "SELECT product_id, available FROM products WHERE product_id = ANY($1)
         ORDER BY product_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let shortage =
        sorted.iter().find_map(
            |line| match stock.iter().find(|(id, _)| *id == line.product_id) {
                None => Some(format!("unknown product {}", line.product_id)),
                Some((_, available)) if *available < line.quantity => Some(format!(
                    "not enough stock of {}: {available} available, {} asked",
                    line.product_id, line.quantity
                )),
                Some(_) => None,
            },
        );
    if let Some(reason) = shortage {
        sqlx::query(
            "INSERT INTO reservations (order_id, state, reason) VALUES ($1, 'refused', $2)",
        )
        .bind(order)
        .bind(&reason)
        .execute(&mut *conn)
        .await?;
        return Ok(answer(Kind::StockFailed).because(reason));
    }
    let quantities: Vec<i64> = sorted.iter().map(|l| l.quantity).collect();
    sqlx::query(
        "WITH l AS (SELECT * FROM unnest($2::text[], $3::bigint[]) AS l(product_id, quantity)),
              held AS (INSERT INTO reservations (order_id, state) VALUES ($1, 'reserved')),
              lines AS (INSERT INTO reservation_lines (order_id, product_id, quantity)
                        SELECT $1, product_id, quantity FROM l)
         UPDATE products p SET available = p.available - l.quantity, updated_at = now()
         FROM l WHERE p.product_id = l.product_id",
    )
    .bind(order)
    .bind(&ids)
    .bind(&quantities)
    .execute(&mut *conn)
    .await?;
    Ok(answer(Kind::StockReserved))
}

/// Gives back what `order` holds; answers `StockReleased`, also when it
/// held nothing. A release that comes first leaves a tombstone.
pub async fn release(conn: &mut PgConnection, order: &str) -> sqlx::Result<Option<SagaMessage>> {
    match state_of(conn, order).await?.map(|(s, _)| s).as_deref() {
        None => {
            sqlx::query(
                "INSERT INTO reservations (order_id, state, reason)
                 VALUES ($1, 'released', 'released before it was reserved')",
            )
            .bind(order)
            .execute(&mut *conn)
            .await?;
        }
        Some("reserved") => {
            sqlx::query(
                "WITH back AS (
                     UPDATE products p SET available = p.available + l.quantity, updated_at = now()
                     FROM reservation_lines l
                     WHERE l.order_id = $1 AND p.product_id = l.product_id)
                 UPDATE reservations SET state = 'released', updated_at = now() WHERE order_id = $1",
            )
            .bind(order)
            .execute(&mut *conn)
            .await?;
        }
        Some("committed") => {
            // The saga releases only before payment and commits only after:
            // sold stock is never released. Answering would lie.
            tracing::error!(order, "a release of a sold reservation; ignored");
            return Ok(None);
        }
        Some(_) => {}
    }
    Ok(Some(SagaMessage::new(Kind::StockReleased, order)))
}

/// Sells what `order` holds; answers `StockCommitted`.
pub async fn commit(conn: &mut PgConnection, order: &str) -> sqlx::Result<Option<SagaMessage>> {
    match state_of(conn, order).await?.map(|(s, _)| s).as_deref() {
        Some("reserved") => {
            sqlx::query("UPDATE reservations SET state = 'committed', updated_at = now() WHERE order_id = $1")
                .bind(order)
                .execute(&mut *conn)
                .await?;
        }
        Some("committed") => {}
        other => {
            tracing::error!(order, state = ?other, "a commit of a reservation not held; ignored");
            return Ok(None);
        }
    }
    Ok(Some(SagaMessage::new(Kind::StockCommitted, order)))
}

/// The most units one product may have, free and reserved together. A
/// reservation moves units from free to reserved and a release moves them
/// back, so neither changes the sum; only [`set_available`] raises it.
/// Bounding it there is what keeps every release (a compensation, which
/// must never fail) far inside `bigint`.
pub const MAX_STOCK: i64 = 1_000_000_000_000;

/// Sets `product`'s available stock, creating the product; `Err` with the
/// units its reservations hold when the two together would exceed
/// [`MAX_STOCK`].
pub async fn set_available(
    pool: &PgPool,
    product: &str,
    available: i64,
) -> sqlx::Result<Result<StockLevel, i64>> {
    let mut tx = pool.begin().await?;
    // The lock a reservation takes, so what it holds cannot move meanwhile.
    sqlx::query("SELECT 1 FROM products WHERE product_id = $1 FOR UPDATE")
        .bind(product)
        .execute(&mut *tx)
        .await?;
    let held: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(l.quantity), 0)::bigint FROM reservation_lines l
         JOIN reservations r ON r.order_id = l.order_id
         WHERE l.product_id = $1 AND r.state = 'reserved'",
    )
    .bind(product)
    .fetch_one(&mut *tx)
    .await?;
    if available > MAX_STOCK - held {
        return Ok(Err(held));
    }
    sqlx::query(
        "INSERT INTO products (product_id, available) VALUES ($1, $2)
         ON CONFLICT (product_id) DO UPDATE SET available = EXCLUDED.available, updated_at = now()",
    )
    .bind(product)
    .bind(available)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ok(level(pool, product)
        .await?
        .expect("the product was just written")))
}

/// `product`'s stock, if it exists.
pub async fn level(pool: &PgPool, product: &str) -> sqlx::Result<Option<StockLevel>> {
    sqlx::query_as(&format!(
        "{LEVEL} WHERE p.product_id = $1 GROUP BY p.product_id"
    ))
    .bind(product)
    .fetch_optional(pool)
    .await
}

/// Every product's stock, by id.
pub async fn levels(pool: &PgPool) -> sqlx::Result<Vec<StockLevel>> {
    sqlx::query_as(&format!(
        "{LEVEL} GROUP BY p.product_id ORDER BY p.product_id"
    ))
    .fetch_all(pool)
    .await
}

/// `order`'s reservation, if it has one.
pub async fn reservation(pool: &PgPool, order: &str) -> sqlx::Result<Option<Reservation>> {
    let row: Option<(String, Option<String>, sqlx::types::Json<Vec<Line>>)> = sqlx::query_as(
        "SELECT r.state, r.reason,
                coalesce(jsonb_agg(jsonb_build_object('product_id', l.product_id,
                                                      'quantity', l.quantity)
                                   ORDER BY l.product_id)
                         FILTER (WHERE l.product_id IS NOT NULL), '[]')
         FROM reservations r LEFT JOIN reservation_lines l ON l.order_id = r.order_id
         WHERE r.order_id = $1 GROUP BY r.order_id",
    )
    .bind(order)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(state, reason, lines)| Reservation {
        order_id: order.to_owned(),
        state,
        reason,
        lines: lines.0,
    }))
}

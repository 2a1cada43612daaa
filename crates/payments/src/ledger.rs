//! payments' SQL. A charge and its refund are idempotent by order id; a
//! charge that arrives after its refund finds the refund's tombstone and
//! takes nothing. Balances never go below zero (a CHECK as well).

use chrono::{DateTime, Utc};
use domain::Money;
use rust_decimal::Decimal;
use saga::{Kind, SagaMessage};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;

/// An account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Account {
    /// Its id.
    #[schema(example = "acc-1")]
    pub account_id: String,
    /// What it holds now.
    pub balance: Money,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
}

/// One order's payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PaymentRecord {
    /// The order.
    pub order_id: String,
    /// `charged`, `failed` or `refunded`.
    pub state: String,
    /// Charged (and, once refunded, given back).
    #[sqlx(try_from = "Decimal")]
    pub amount: Money,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was first recorded.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

type AccountRow = (String, Decimal, DateTime<Utc>);

fn account((account_id, balance, created_at): AccountRow) -> Account {
    Account {
        account_id,
        balance: Money(balance),
        created_at,
    }
}

/// Opens `id` with a zero balance; `None` when it exists already.
pub async fn open(pool: &PgPool, id: &str) -> sqlx::Result<Option<Account>> {
    let row: Option<AccountRow> = sqlx::query_as(
        "INSERT INTO accounts (account_id, balance) VALUES ($1, 0)
         ON CONFLICT DO NOTHING RETURNING account_id, balance, created_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(account))
}

/// The most an account's funds may come to: its balance plus what is
/// charged and not refunded, the largest amount of `numeric(15, 2)`. A
/// charge moves money from the balance to the charge and a refund moves it
/// back, so neither changes the funds; only a top-up raises them. Bounding
/// top-ups by it is what keeps every refund (a compensation, which must
/// never fail) within the balance column.
pub const MAX_FUNDS: Money = Money(Decimal::from_parts(2_764_472_319, 232_830, 0, false, 2));

/// What a top-up did.
#[derive(Debug)]
pub enum TopUp {
    /// The account after it.
    Done(Account),
    /// There is no such account.
    NoAccount,
    /// It would take the funds over [`MAX_FUNDS`]; `room` is what may
    /// still be added.
    OverMaximum {
        /// How much more the account's funds can take.
        room: Money,
    },
}

/// Adds `amount` to the balance of account `id` and records the top-up,
/// unless the account's funds would exceed [`MAX_FUNDS`].
pub async fn top_up(pool: &PgPool, id: &str, amount: Money) -> sqlx::Result<TopUp> {
    let mut tx = pool.begin().await?;
    // The lock a charge takes too, so the funds cannot move meanwhile.
    let funds: Option<Decimal> = sqlx::query_scalar(
        "SELECT a.balance + coalesce((SELECT sum(p.amount) FROM payments p
                                      WHERE p.account_id = a.account_id AND p.state = 'charged'), 0)
         FROM accounts a WHERE a.account_id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(funds) = funds else {
        return Ok(TopUp::NoAccount);
    };
    let room = (MAX_FUNDS.0 - funds).max(Decimal::ZERO);
    if amount.0 > room {
        return Ok(TopUp::OverMaximum { room: Money(room) });
    }
    let row: AccountRow = sqlx::query_as(
        "WITH a AS (
             UPDATE accounts SET balance = balance + $2, updated_at = now()
             WHERE account_id = $1 RETURNING account_id, balance, created_at),
         t AS (INSERT INTO top_ups (account_id, amount) SELECT account_id, $2 FROM a)
         SELECT * FROM a",
    )
    .bind(id)
    .bind(amount.0)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(TopUp::Done(account(row)))
}

/// The account `id`, if it exists.
pub async fn get(pool: &PgPool, id: &str) -> sqlx::Result<Option<Account>> {
    let row: Option<AccountRow> = sqlx::query_as(
        "SELECT account_id, balance, created_at FROM accounts WHERE account_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(account))
}

/// The payments of account `id`, newest first, at most `limit`.
pub async fn payments_of(pool: &PgPool, id: &str, limit: i64) -> sqlx::Result<Vec<PaymentRecord>> {
    sqlx::query_as(
        "SELECT order_id, state, amount, reason, created_at, updated_at FROM payments
         WHERE account_id = $1 ORDER BY created_at DESC, order_id LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

async fn payment_of(
    conn: &mut PgConnection,
    order: &str,
) -> sqlx::Result<Option<(String, Decimal, Option<String>)>> {
    sqlx::query_as("SELECT state, amount, reason FROM payments WHERE order_id = $1 FOR UPDATE")
        .bind(order)
        .fetch_optional(conn)
        .await
}

/// Takes `amount` from `account` for `order`, or nothing; answers
/// `PaymentSucceeded` or `PaymentFailed` with the reason.
pub async fn charge(
    conn: &mut PgConnection,
    order: &str,
    account: &str,
    amount: Money,
) -> sqlx::Result<SagaMessage> {
    let answer = |kind| SagaMessage::new(kind, order);
    if let Some((state, charged, reason)) = payment_of(conn, order).await? {
        return Ok(match state.as_str() {
            "charged" => answer(Kind::PaymentSucceeded).amount(Money(charged)),
            "refunded" if reason.is_some() => answer(Kind::PaymentFailed)
                .because("the order was cancelled before its charge arrived"),
            "refunded" => answer(Kind::PaymentFailed).because("the order was refunded"),
            _ => answer(Kind::PaymentFailed).because(reason.unwrap_or_else(|| "failed".into())),
        });
    }
    let balance: Option<Decimal> =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = $1 FOR UPDATE")
            .bind(account)
            .fetch_optional(&mut *conn)
            .await?;
    let refusal = match balance {
        None => Some((None, format!("no account {account}"))),
        Some(b) if b < amount.0 => Some((Some(account), "insufficient funds".to_owned())),
        Some(_) => None,
    };
    if let Some((known, reason)) = refusal {
        sqlx::query(
            "INSERT INTO payments (order_id, account_id, amount, state, reason)
             VALUES ($1, $2, $3, 'failed', $4)",
        )
        .bind(order)
        .bind(known)
        .bind(amount.0)
        .bind(&reason)
        .execute(&mut *conn)
        .await?;
        return Ok(answer(Kind::PaymentFailed).because(reason));
    }
    sqlx::query(
        "WITH debit AS (UPDATE accounts SET balance = balance - $3, updated_at = now()
                        WHERE account_id = $2)
         INSERT INTO payments (order_id, account_id, amount, state) VALUES ($1, $2, $3, 'charged')",
    )
    .bind(order)
    .bind(account)
    .bind(amount.0)
    .execute(&mut *conn)
    .await?;
    Ok(answer(Kind::PaymentSucceeded).amount(amount))
}

/// Gives back what `order` was charged; answers `PaymentRefunded` with the
/// amount, 0 when nothing was charged. A refund that comes first leaves a
/// tombstone.
pub async fn refund(
    conn: &mut PgConnection,
    order: &str,
    asked: Option<Money>,
) -> sqlx::Result<SagaMessage> {
    let payment = payment_of(conn, order).await?;
    // The saga names the charge it compensates by its amount; a refund of
    // another amount is not one it asked for. (Commands from before the
    // amount was sent name none.)
    if let (Some(asked), Some((state, charged, _))) = (asked, &payment) {
        if state == "charged" && asked.0 != *charged {
            return Err(sqlx::Error::InvalidArgument(format!(
                "a refund of {} for order {order} does not match its charge of {charged}",
                asked.0
            )));
        }
    }
    let refunded = match payment {
        None => {
            sqlx::query(
                "INSERT INTO payments (order_id, amount, state, reason)
                 VALUES ($1, 0, 'refunded', 'refunded before it was charged')",
            )
            .bind(order)
            .execute(&mut *conn)
            .await?;
            Decimal::ZERO
        }
        Some((state, amount, _)) if state == "charged" => {
            sqlx::query(
                "WITH credit AS (
                     UPDATE accounts a SET balance = a.balance + p.amount, updated_at = now()
                     FROM payments p WHERE p.order_id = $1 AND a.account_id = p.account_id)
                 UPDATE payments SET state = 'refunded', updated_at = now() WHERE order_id = $1",
            )
            .bind(order)
            .execute(&mut *conn)
            .await?;
            amount
        }
        Some((state, amount, _)) if state == "refunded" => amount,
        Some(_) => Decimal::ZERO,
    };
    Ok(SagaMessage::new(Kind::PaymentRefunded, order).amount(Money(refunded)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maximum_is_the_largest_amount_the_balance_column_holds() {
        assert_eq!(MAX_FUNDS.0.to_string(), "9999999999999.99");
        assert!(MAX_FUNDS.0 < domain::money::MAX_MONEY);
    }
}

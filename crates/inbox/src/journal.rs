//! The `journal` consumer: records every order event it receives, in the
//! order applied, in `order_journal`. It is the simplest real consumer of
//! the `order` stream, and the one the end-to-end tests read to prove that
//! every event arrives once and in version order.

use domain::{OrderEvent, OrderNotice};
use sqlx::PgConnection;

use crate::{Handler, Incoming, Poison};

/// The journal's handler.
pub struct Journal {
    consumer: String,
}

impl Journal {
    /// The journal of consumer `consumer` (its rows carry the name, so two
    /// journals can share a database).
    pub fn new(consumer: &str) -> Self {
        Self {
            consumer: consumer.to_owned(),
        }
    }
}

/// Decodes an order notice, telling apart the three kinds of poison.
pub fn decode_notice(payload: &[u8]) -> Result<OrderNotice, Poison> {
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| Poison::new("bad_json", format!("the body is not JSON: {e}")))?;
    let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
    if OrderEvent::parse(kind).is_none() {
        return Err(Poison::new(
            "unknown_type",
            format!("{kind:?} is not an order event"),
        ));
    }
    let notice: OrderNotice = serde_json::from_value(value)
        .map_err(|e| Poison::new("invalid", format!("not an order notice: {e}")))?;
    notice.check().map_err(|e| Poison::new("invalid", e))?;
    Ok(notice)
}

#[async_trait::async_trait]
impl Handler for Journal {
    type Message = OrderNotice;

    fn decode(&self, incoming: &Incoming) -> Result<OrderNotice, Poison> {
        decode_notice(&incoming.payload)
    }

    async fn apply(&self, conn: &mut PgConnection, n: &OrderNotice) -> sqlx::Result<()> {
        self.apply_batch(conn, &[n]).await
    }

    /// One statement for the batch; rows take their `seq` in batch order.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        notices: &[&OrderNotice],
    ) -> sqlx::Result<()> {
        if notices.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&OrderNotice) -> String| notices.iter().map(|n| f(n)).collect();
        let (orders, kinds, statuses): (Vec<String>, Vec<String>, Vec<String>) = (
            column(|n| n.order_id.clone()),
            column(|n| n.kind.as_str().to_owned()),
            column(|n| n.status.clone()),
        );
        sqlx::query(
            "INSERT INTO order_journal (consumer, event_id, order_id, version, type, status,
                                        previous_status, occurred_at)
             SELECT $1, u.event_id, u.order_id, u.version, u.type, u.status, u.previous_status,
                    u.occurred_at
             FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                         $7::text[], $8::timestamptz[])
                  WITH ORDINALITY
                  AS u(event_id, order_id, version, type, status, previous_status, occurred_at, n)
             ORDER BY u.n",
        )
        .bind(&self.consumer)
        .bind(notices.iter().map(|n| n.idempotent_key).collect::<Vec<_>>())
        .bind(orders)
        .bind(notices.iter().map(|n| n.version).collect::<Vec<_>>())
        .bind(kinds)
        .bind(statuses)
        .bind(
            notices
                .iter()
                .map(|n| n.previous_status.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(notices.iter().map(|n| n.occurred_at).collect::<Vec<_>>())
        .execute(conn)
        .await?;
        Ok(())
    }
}

//! Orders ingested from a broker (seed 002): `orders-center ingest` reads
//! whole orders from a Kafka topic or a RabbitMQ queue (`orders.in`) and
//! saves each through the same validation and save path as `PUT`, so it
//! reaches 1C and the event streams like any save.
//!
//! A message is the body of a `PUT` plus the sender's `version` of the
//! order (what `GET` answers has that shape too). Its inbox key is
//! `<order id>@<version>`, so a redelivery is a duplicate; and a version
//! not newer than the last one applied for that order changes nothing.
//! Kafka keeps one order's messages in order when they are keyed by the
//! order id; a RabbitMQ queue has one active consumer.
//!
//! A message the API would refuse is poison: its dead letter carries the
//! problem+json document the API would have answered (`dead-reason`).

use domain::{OrderFull, ValidOrder};
use inbox::{Handler, Incoming, Poison};
use sqlx::PgConnection;
use store::{SaveContext, Store};

/// The consumer's name: its group, queue and inbox rows.
pub const CONSUMER: &str = "ingest";

/// Where orders come from unless configured: a Kafka topic, or a RabbitMQ
/// exchange of that name whose queue is `ingest.orders.in`.
pub const DEFAULT_SOURCE: &str = "orders.in";

/// Transactions a batch is split over unless configured: PostgreSQL works
/// on one while the process prepares the other (BENCHMARKS.md).
pub const DEFAULT_TRANSACTIONS: usize = 2;

/// Who a save by ingestion is recorded as in the history.
const USER: &str = "ingest";

/// One order message, validated.
#[derive(Debug)]
pub struct OrderMessage {
    order: ValidOrder,
    version: i64,
}

/// The ingestion handler.
pub struct Ingest {
    store: Store,
}

impl Ingest {
    /// Saving through `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// A poison whose reason is the problem document the API would answer.
fn refused(class: &'static str, error: api::ApiError) -> Poison {
    Poison::new(
        class,
        serde_json::to_string(&error.problem()).expect("problems serialize"),
    )
}

/// Decodes and validates one message as `PUT` would, without the database.
pub fn decode(payload: &[u8]) -> Result<OrderMessage, Poison> {
    let mut body: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        refused(
            "bad_json",
            api::ApiError::BadRequest(format!("the body is not JSON: {e}")),
        )
    })?;
    let version = body
        .as_object_mut()
        .and_then(|o| o.remove("version"))
        .and_then(|v| v.as_i64())
        .filter(|v| *v >= 1);
    // `sync` is what GET adds; accept a GET's answer as it is.
    if let Some(o) = body.as_object_mut() {
        o.remove("sync");
    }
    let full: OrderFull = serde_json::from_value(body)
        .map_err(|e| refused("invalid", api::ApiError::UnprocessableBody(e.to_string())))?;
    let Some(version) = version else {
        return Err(refused(
            "invalid",
            api::ApiError::invalid("version", "the sender's version of the order, 1 or more"),
        ));
    };
    if full.checkout.is_some() {
        return Err(refused(
            "invalid",
            api::ApiError::invalid(
                "checkout",
                "ingestion saves orders; a saga starts only through the API",
            ),
        ));
    }
    if full.order.id.is_empty() {
        return Err(refused(
            "invalid",
            api::ApiError::invalid("order.id", "an ingested order names its id"),
        ));
    }
    let order = full
        .validate(None)
        .map_err(|e| refused("invalid", e.into()))?;
    Ok(OrderMessage { order, version })
}

#[async_trait::async_trait]
impl Handler for Ingest {
    type Message = OrderMessage;

    fn decode(&self, incoming: &Incoming) -> Result<OrderMessage, Poison> {
        decode(&incoming.payload)
    }

    fn ids_from_body(&self) -> bool {
        true
    }

    fn message_id(&self, _incoming: &Incoming, m: &OrderMessage) -> Option<String> {
        Some(format!("{}@{}", m.order.id(), m.version))
    }

    fn ordering_key<'m>(&self, m: &'m OrderMessage) -> Option<&'m str> {
        Some(m.order.id().as_str())
    }

    async fn apply(&self, conn: &mut PgConnection, m: &OrderMessage) -> sqlx::Result<()> {
        self.apply_batch(conn, &[m]).await
    }

    /// Set-based: one guard statement and one batch save per round, where
    /// round k holds the k-th message of each order in the batch, so an
    /// order's versions still apply in order.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &[&OrderMessage],
    ) -> sqlx::Result<()> {
        let mut rounds: Vec<Vec<&OrderMessage>> = Vec::new();
        let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for m in batch {
            let round = seen.entry(m.order.id().as_str()).or_insert(0);
            if rounds.len() <= *round {
                rounds.push(Vec::new());
            }
            rounds[*round].push(m);
            *round += 1;
        }
        let ctx = SaveContext {
            user_id: USER.into(),
            traceparent: None,
        };
        for round in rounds {
            let newer: std::collections::HashSet<String> = sqlx::query_scalar(
                "INSERT INTO ingested_orders (order_id, version)
                 SELECT * FROM unnest($1::text[], $2::bigint[])
                 ON CONFLICT (order_id) DO UPDATE
                     SET version = EXCLUDED.version, ingested_at = now()
                     WHERE ingested_orders.version < EXCLUDED.version
                 RETURNING order_id",
            )
            .bind(
                round
                    .iter()
                    .map(|m| m.order.id().as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(round.iter().map(|m| m.version).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
            let (apply, stale): (Vec<&OrderMessage>, Vec<&OrderMessage>) = round
                .iter()
                .partition(|m| newer.contains(m.order.id().as_str()));
            for m in stale {
                tracing::info!(order = %m.order.id(), version = m.version, "not newer than the version ingested; skipped");
            }
            let orders: Vec<&ValidOrder> = apply.iter().map(|m| &m.order).collect();
            self.store.save_orders_in(conn, &orders, &ctx).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(version: Option<i64>) -> serde_json::Value {
        let mut v = serde_json::json!({
            "order": {"id": "I-1", "type": "delivery", "status": "new", "city": "Almaty",
                      "subdivision": "ALM-01", "price": 10.5, "platform": "web",
                      "general_id": "0190a6f6-2a9b-7c1e-9f6a-3c1f2d4e5b6a",
                      "order_number": "N-1", "executor": "c-1"},
            "items": [{"product_id": "P-1", "base_price": 10.5, "price": 10.5}]
        });
        if let Some(version) = version {
            v["version"] = version.into();
        }
        v
    }

    fn problem(p: &Poison) -> serde_json::Value {
        serde_json::from_str(&p.reason).expect("the reason is a problem document")
    }

    #[test]
    fn a_valid_message_decodes_with_its_inbox_key() {
        let m = decode(body(Some(3)).to_string().as_bytes()).unwrap();
        let ingest_key = format!("{}@{}", m.order.id(), m.version);
        assert_eq!(ingest_key, "I-1@3");
    }

    #[test]
    fn refusals_carry_the_problem_the_api_would_answer() {
        let bad = decode(b"{not json").unwrap_err();
        assert_eq!(bad.class, "bad_json");
        assert_eq!(problem(&bad)["status"], 400);

        let no_version = decode(body(None).to_string().as_bytes()).unwrap_err();
        assert_eq!(no_version.class, "invalid");
        assert_eq!(problem(&no_version)["errors"][0]["field"], "version");

        let mut negative = body(Some(1));
        negative["items"][0]["price"] = (-1).into();
        let p = problem(&decode(negative.to_string().as_bytes()).unwrap_err());
        assert_eq!(p["status"], 422);
        assert_eq!(p["type"], "urn:orders-center:problem:validation-failed");

        let mut shape = body(Some(1));
        shape["order"]["price"] = "ten".into();
        let p = problem(&decode(shape.to_string().as_bytes()).unwrap_err());
        assert_eq!(p["type"], "urn:orders-center:problem:invalid-body");

        let mut checkout = body(Some(1));
        checkout["checkout"] = serde_json::json!({"account_id": "a", "reserve": []});
        assert_eq!(
            decode(checkout.to_string().as_bytes()).unwrap_err().class,
            "invalid"
        );
    }
}

//! Idempotent creates: the first response to a key is stored in the same
//! transaction as the order, and a retry gets it back instead of a new order.

use domain::ValidOrder;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::types::Json;

use crate::checkout::save_in;
use crate::{Error, Precondition, Result, SaveContext, Store};

/// An `Idempotency-Key` header value: 1–255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks the header value.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 255 {
            return Err("must be 1 to 255 characters".into());
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII".into());
        }
        Ok(Self(s.to_owned()))
    }
}

/// SHA-256 of the canonical JSON of a request, so reformatting the same body
/// is still "the same request".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHash([u8; 32]);

impl RequestHash {
    /// Hashes the request as parsed.
    pub fn of(request: &impl Serialize) -> Self {
        let bytes = serde_json::to_vec(request).expect("request types serialize");
        Self(Sha256::digest(bytes).into())
    }
}

/// The result of an idempotent create.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    /// This request created the order.
    Created(Box<crate::Saved>),
    /// An earlier request with this key already did; here is its response.
    Replayed {
        /// HTTP status of the first response.
        status: u16,
        /// Body of the first response.
        body: serde_json::Value,
    },
}

impl Store {
    /// Creates an order, failing with [`Error::PreconditionFailed`] if its id
    /// is taken. With a key, a retry returns the stored first response; the
    /// same key with another request fails with [`Error::IdempotencyKeyReused`].
    pub async fn create_order(
        &self,
        order: &ValidOrder,
        key: Option<(&IdempotencyKey, RequestHash)>,
        ctx: &SaveContext,
    ) -> Result<CreateOutcome> {
        let mut tx = self.pool.begin().await?;
        if let Some((key, hash)) = key {
            // Taking the key first serializes concurrent retries: the second
            // waits here until the first commits or rolls back.
            let claimed = sqlx::query(
                "INSERT INTO idempotency_keys (key, request_hash) VALUES ($1, $2)
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(&key.0)
            .bind(&hash.0[..])
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !claimed {
                let (stored_hash, status, body): (
                    Vec<u8>,
                    Option<i16>,
                    Option<Json<serde_json::Value>>,
                ) = sqlx::query_as(
                    "SELECT request_hash, response_status, response_body
                         FROM idempotency_keys WHERE key = $1",
                )
                .bind(&key.0)
                .fetch_one(&mut *tx)
                .await?;
                if stored_hash != hash.0 {
                    return Err(Error::IdempotencyKeyReused(key.0.clone()));
                }
                let (Some(status), Some(body)) = (status, body) else {
                    return Err(Error::Invariant(format!(
                        "idempotency key {:?} committed without a response",
                        key.0
                    )));
                };
                return Ok(CreateOutcome::Replayed {
                    status: status as u16,
                    body: body.0,
                });
            }
            let saved = save_in(&mut tx, self, order, Precondition::Absent, ctx).await?;
            sqlx::query(
                "UPDATE idempotency_keys SET response_status = 201, response_body = $2
                 WHERE key = $1",
            )
            .bind(&key.0)
            .bind(Json(&saved.view))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(CreateOutcome::Created(Box::new(saved)));
        }
        let saved = save_in(&mut tx, self, order, Precondition::Absent, ctx).await?;
        tx.commit().await?;
        Ok(CreateOutcome::Created(Box::new(saved)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_short_visible_ascii() {
        assert!(IdempotencyKey::parse("order-42:retry").is_ok());
        for bad in ["", "has space", "ключ", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn equal_requests_hash_equal_and_different_ones_do_not() {
        let a = serde_json::json!({"a": 1, "b": [1, 2]});
        let b: serde_json::Value = serde_json::from_str(r#"{ "a":1,  "b":[1,2] }"#).unwrap();
        assert_eq!(RequestHash::of(&a), RequestHash::of(&b));
        assert_ne!(
            RequestHash::of(&a),
            RequestHash::of(&serde_json::json!({"a": 2}))
        );
    }
}

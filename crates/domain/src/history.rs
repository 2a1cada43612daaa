//! Order history: which changes are recorded and how.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a history row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// The order's status changed.
    Status,
    /// The order's total price changed.
    Price,
}

impl HistoryKind {
    /// The wire and database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Price => "price",
        }
    }

    /// The numeric `type_id` of the seed's History.
    pub fn type_id(self) -> i32 {
        match self {
            Self::Status => 1,
            Self::Price => 2,
        }
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Status, Self::Price]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One recorded change of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    /// What changed.
    #[serde(rename = "type")]
    pub kind: HistoryKind,
    /// Numeric form of `type`: 1 status, 2 price.
    pub type_id: i32,
    /// The value before (a status string or a price number); `null` when
    /// the order was created.
    #[schema(value_type = Value)]
    pub old_value: serde_json::Value,
    /// The value after: a status string or a price number.
    #[schema(value_type = Value)]
    pub value: serde_json::Value,
    /// When the change was saved.
    pub date: DateTime<Utc>,
    /// Who made it, from `X-User-Id` or the status change body; empty if unknown.
    pub user_id: String,
    /// The order.
    pub order_id: String,
    /// The order version that introduced the change.
    pub version: i64,
}

/// A change still to be written as a history row.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// What changed.
    pub kind: HistoryKind,
    /// The value before; `Null` on creation.
    pub old_value: serde_json::Value,
    /// The value after.
    pub value: serde_json::Value,
}

/// The status and price an order had before a save.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracked {
    /// Status before the save.
    pub status: String,
    /// Price before the save.
    pub price: crate::Money,
}

/// The history rows a save produces: one per changed tracked field, and both
/// fields when the order is new.
pub fn changes(before: Option<&Tracked>, after: &Tracked) -> Vec<Change> {
    let mut out = Vec::with_capacity(2);
    let (old_status, old_price) = match before {
        Some(b) => (Some(b.status.as_str()), Some(b.price)),
        None => (None, None),
    };
    if old_status != Some(after.status.as_str()) {
        out.push(Change {
            kind: HistoryKind::Status,
            old_value: old_status.map_or(serde_json::Value::Null, Into::into),
            value: after.status.clone().into(),
        });
    }
    if old_price != Some(after.price) {
        out.push(Change {
            kind: HistoryKind::Price,
            old_value: old_price.map_or(serde_json::Value::Null, Into::into),
            value: after.price.into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tracked(status: &str, price: &str) -> Tracked {
        Tracked {
            status: status.into(),
            price: price.parse().unwrap(),
        }
    }

    #[test]
    fn a_new_order_records_its_initial_status_and_price() {
        let out = changes(None, &tracked("new", "10.50"));
        assert_eq!(
            out,
            vec![
                Change {
                    kind: HistoryKind::Status,
                    old_value: json!(null),
                    value: json!("new")
                },
                Change {
                    kind: HistoryKind::Price,
                    old_value: json!(null),
                    value: json!(10.5)
                },
            ]
        );
    }

    #[test]
    fn an_unchanged_order_records_nothing_whatever_the_scale_of_its_price() {
        assert!(changes(Some(&tracked("new", "1")), &tracked("new", "1.00")).is_empty());
    }

    #[test]
    fn only_the_changed_field_is_recorded() {
        let out = changes(Some(&tracked("new", "1")), &tracked("paid", "1"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, HistoryKind::Status);
        assert_eq!(out[0].old_value, json!("new"));
        assert_eq!(out[0].value, json!("paid"));

        let out = changes(Some(&tracked("new", "1")), &tracked("new", "2.25"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, HistoryKind::Price);
        assert_eq!(out[0].old_value, json!(1));
        assert_eq!(out[0].value, json!(2.25));
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in [HistoryKind::Status, HistoryKind::Price] {
            assert_eq!(HistoryKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(HistoryKind::parse("color"), None);
    }
}

//! The order as other services send it and as 1C receives it (seed `000`, task 1).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::checkout::Checkout;
use crate::history::HistoryEntry;
use crate::money::Money;

/// The whole order in one structure: the order, its items, payments and history.
///
/// History and the server-owned timestamps are ignored on input, so a client
/// may send back what it read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrderFull {
    /// The order itself.
    pub order: Order,
    /// Order lines, in the order given.
    #[serde(default)]
    pub items: Vec<OrderItem>,
    /// Payments, in the order given.
    #[serde(default)]
    pub payments: Vec<Payment>,
    /// Status and price changes, oldest first. Written by the server only.
    #[serde(default, skip_deserializing)]
    #[schema(read_only)]
    pub history: Vec<HistoryEntry>,
    /// On create only: start the order's saga, which reserves this stock,
    /// charges `order.price` to this account, and owns the status from
    /// then on (`pending` → … → `completed` or `cancelled`). Never returned.
    #[serde(default, skip_serializing)]
    #[schema(write_only)]
    pub checkout: Option<Checkout>,
}

/// The order header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Order {
    /// Order id. Optional in the body: the path (PUT) or the server (POST) supplies it.
    #[serde(default)]
    #[schema(example = "ORD-1001")]
    pub id: String,
    /// Order type, e.g. `delivery` or `pickup`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Current status, e.g. `new`.
    #[schema(example = "new")]
    pub status: String,
    /// City of the order.
    #[serde(default)]
    pub city: String,
    /// Subdivision (branch) handling the order.
    #[serde(default)]
    pub subdivision: String,
    /// Total price, non-negative, at most two decimal places.
    #[schema(example = 1999.99)]
    pub price: Money,
    /// Platform the order came from, e.g. `web`.
    #[serde(default)]
    pub platform: String,
    /// Cross-system id of the order.
    pub general_id: Uuid,
    /// Human-facing order number.
    #[serde(default)]
    pub order_number: String,
    /// Who executes the order.
    #[serde(default)]
    pub executor: String,
    /// Set by the server when the order is first saved.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub created_at: Option<DateTime<Utc>>,
    /// Set by the server on every save.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub updated_at: Option<DateTime<Utc>>,
}

/// One order line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrderItem {
    /// Product id; required.
    pub product_id: String,
    /// Id of the line in the sending system.
    #[serde(default)]
    pub external_id: String,
    /// Line status.
    #[serde(default)]
    pub status: String,
    /// Price before discounts.
    pub base_price: Money,
    /// Price charged.
    pub price: Money,
    /// Bonuses earned by this line.
    #[serde(default)]
    pub earned_bonuses: Money,
    /// Bonuses spent on this line.
    #[serde(default)]
    pub spent_bonuses: Money,
    /// Whether the line is a gift.
    #[serde(default)]
    pub gift: bool,
    /// Owner of the line.
    #[serde(default)]
    pub owner_id: String,
    /// Delivery the line belongs to.
    #[serde(default)]
    pub delivery_id: String,
    /// Shop assistant who sold it.
    #[serde(default)]
    pub shop_assistant: String,
    /// Warehouse it ships from.
    #[serde(default)]
    pub warehouse: String,
    /// The order's id. Optional on input; when given it must match the order.
    #[serde(default)]
    pub order_id: Option<String>,
}

/// One payment of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Payment {
    /// Payment id, unique within the order.
    pub id: Uuid,
    /// The order's id. Optional on input; when given it must match the order.
    #[serde(default)]
    pub order_id: Option<String>,
    /// How it is paid.
    #[serde(rename = "type")]
    pub kind: PaymentType,
    /// Amount, non-negative, at most two decimal places.
    pub sum: Money,
    /// Whether it has been paid.
    #[serde(default)]
    pub payed: bool,
    /// Free-form note.
    #[serde(default)]
    pub info: String,
    /// Credit terms; required for `credit` and allowed only there.
    #[serde(default)]
    pub credit_data: Option<CreditData>,
    /// Contract number.
    #[serde(default)]
    pub contract_number: String,
    /// Card details; allowed only for `card` and `card_online`.
    #[serde(default)]
    pub card_payment_data: Option<CardPaymentData>,
    /// Id of the payment in the sending system.
    #[serde(default)]
    pub external_id: String,
}

/// The closed set of payment types; anything else is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentType {
    /// Cash at the shop.
    CashAtShop,
    /// Cash to the courier.
    CashToCourier,
    /// Card at the shop or to the courier.
    Card,
    /// Card online.
    CardOnline,
    /// Credit, with `credit_data`.
    Credit,
    /// Bonus points.
    Bonuses,
    /// Bank transfer.
    Cashless,
    /// Prepayment.
    Prepayment,
}

impl PaymentType {
    /// Every variant, in declaration order.
    pub const ALL: [PaymentType; 8] = [
        Self::CashAtShop,
        Self::CashToCourier,
        Self::Card,
        Self::CardOnline,
        Self::Credit,
        Self::Bonuses,
        Self::Cashless,
        Self::Prepayment,
    ];

    /// The wire and database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CashAtShop => "cash_at_shop",
            Self::CashToCourier => "cash_to_courier",
            Self::Card => "card",
            Self::CardOnline => "card_online",
            Self::Credit => "credit",
            Self::Bonuses => "bonuses",
            Self::Cashless => "cashless",
            Self::Prepayment => "prepayment",
        }
    }

    /// Parses the wire and database name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether card details may accompany this type.
    pub fn takes_card_data(self) -> bool {
        matches!(self, Self::Card | Self::CardOnline)
    }
}

/// Credit terms of a `credit` payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreditData {
    /// Lending bank.
    #[serde(default)]
    pub bank: String,
    /// Credit product type.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Term in months, 1 to 360.
    pub number_of_months: i16,
    /// Monthly payment, non-negative.
    #[serde(default)]
    pub pay_sum_per_month: Money,
    /// Broker id, non-negative.
    #[serde(default)]
    pub broker_id: i32,
    /// Borrower's IIN: empty or 12 digits.
    #[serde(default)]
    pub iin: String,
}

/// Card details of a card payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CardPaymentData {
    /// Payment provider.
    #[serde(default)]
    pub provider: String,
    /// Provider's transaction id.
    #[serde(default)]
    pub transaction_id: String,
}

/// An order as the API returns it: the OrderFull plus its version and 1C sync state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    /// The order, its items, payments and history.
    #[serde(flatten)]
    pub full: OrderFull,
    /// Incremented by every save; send it back in `If-Match`.
    pub version: i64,
    /// Delivery state of the latest version; absent if it left the outbox.
    pub sync: Option<crate::task::SyncStatus>,
}

/// One row of the order list: the header and its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrderSummary {
    /// The order header.
    pub order: Order,
    /// Current version.
    pub version: i64,
}

//! The orders-center domain: the seed's order types, their validation and the
//! history rules. No I/O lives here.

pub mod checkout;
pub mod event;
pub mod history;
pub mod money;
pub mod order;
pub mod task;
pub mod validation;

pub use checkout::Checkout;
pub use event::{
    DeliveryPolicy, Destination, OrderEvent, OrderNotice, Routes, ONEC, ORDER_AGGREGATE,
};
pub use history::{Change, HistoryEntry, HistoryKind, Tracked};
pub use money::{Money, MAX_MONEY};
pub use order::{
    CardPaymentData, CreditData, Order, OrderFull, OrderItem, OrderSummary, OrderView, Payment,
    PaymentType,
};
pub use task::{SyncStats, SyncStatus, TaskState, TaskSummary};
pub use validation::{FieldError, OrderId, StatusChange, ValidOrder, ValidationErrors};

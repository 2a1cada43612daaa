//! Input rules. Everything a client sends passes through here before the store
//! sees it, so the database only ever holds values these rules accept.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::money::Money;
use crate::order::{OrderFull, Payment, PaymentType};

/// Longest order id.
pub const MAX_ID_LEN: usize = 64;
/// Longest ordinary text field.
pub const MAX_TEXT_LEN: usize = 255;
/// Longest free-form note (`payment.info`).
pub const MAX_NOTE_LEN: usize = 2000;
/// Most items in one order.
pub const MAX_ITEMS: usize = 500;
/// Most payments in one order.
pub const MAX_PAYMENTS: usize = 50;

/// One rule a field broke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `items[2].price`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every rule an input broke, so a client can fix them all in one go.
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
#[error("{} invalid field(s): {}", .0.len(), summary(.0))]
pub struct ValidationErrors(pub Vec<FieldError>);

fn summary(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ValidationErrors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn into_result<T>(self, ok: T) -> Result<T, Self> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(self)
        }
    }

    /// A single error.
    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::default();
        e.push(field, message);
        e
    }
}

/// An order id: 1–64 characters of `A-Z a-z 0-9 - _ .`, not starting with a dot,
/// so it is safe in paths, logs and 1C URLs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct OrderId(String);

impl OrderId {
    /// Checks `s` against the id rules.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > MAX_ID_LEN {
            return Err(format!("must be at most {MAX_ID_LEN} characters"));
        }
        if s.starts_with('.') {
            return Err("must not start with '.'".into());
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err("may contain only letters, digits, '-', '_' and '.'".into());
        }
        Ok(Self(s.to_owned()))
    }

    /// A fresh, time-ordered id for orders created without one.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An [`OrderFull`] that passed every rule, with its id and the ids of its
/// items and payments filled in. Only the store consumes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidOrder {
    id: OrderId,
    full: OrderFull,
}

impl ValidOrder {
    /// The order's id.
    pub fn id(&self) -> &OrderId {
        &self.id
    }

    /// The validated order.
    pub fn get(&self) -> &OrderFull {
        &self.full
    }
}

impl OrderFull {
    /// Validates an order sent by a client.
    ///
    /// `target` is the id from the path of a PUT; the body's `order.id` must then
    /// be empty or equal to it. With no target (POST) an empty body id gets a
    /// freshly generated one.
    pub fn validate(mut self, target: Option<&OrderId>) -> Result<ValidOrder, ValidationErrors> {
        let mut errs = ValidationErrors::default();
        let id = match (target, self.order.id.is_empty()) {
            (Some(t), true) => Some(t.clone()),
            (None, true) => Some(OrderId::generate()),
            (target, false) => match OrderId::parse(&self.order.id) {
                Ok(id) if target.is_some_and(|t| *t != id) => {
                    errs.push("order.id", "does not match the id in the path");
                    None
                }
                Ok(id) => Some(id),
                Err(m) => {
                    errs.push("order.id", m);
                    None
                }
            },
        };

        if let Some(checkout) = &self.checkout {
            // The saga owns the status of an order it runs.
            self.order.status = "pending".into();
            for (field, message) in checkout.problems() {
                errs.push(field, message);
            }
            if self.order.price.0.is_zero() {
                errs.push("order.price", "must be above zero: the checkout charges it");
            }
        }
        let o = &self.order;
        required(&mut errs, "order.status", &o.status);
        for (field, value) in [
            ("order.type", &o.kind),
            ("order.status", &o.status),
            ("order.city", &o.city),
            ("order.subdivision", &o.subdivision),
            ("order.platform", &o.platform),
            ("order.order_number", &o.order_number),
            ("order.executor", &o.executor),
        ] {
            text(&mut errs, field, value, MAX_TEXT_LEN);
        }
        money(&mut errs, "order.price", o.price);
        if o.general_id.is_nil() {
            errs.push("order.general_id", "must not be the nil UUID");
        }

        if self.items.len() > MAX_ITEMS {
            errs.push("items", format!("at most {MAX_ITEMS} items"));
        }
        for (i, item) in self.items.iter().enumerate() {
            let at = |f: &str| format!("items[{i}].{f}");
            required(&mut errs, at("product_id"), &item.product_id);
            for (f, value) in [
                ("product_id", &item.product_id),
                ("external_id", &item.external_id),
                ("status", &item.status),
                ("owner_id", &item.owner_id),
                ("delivery_id", &item.delivery_id),
                ("shop_assistant", &item.shop_assistant),
                ("warehouse", &item.warehouse),
            ] {
                text(&mut errs, at(f), value, MAX_TEXT_LEN);
            }
            for (f, value) in [
                ("base_price", item.base_price),
                ("price", item.price),
                ("earned_bonuses", item.earned_bonuses),
                ("spent_bonuses", item.spent_bonuses),
            ] {
                money(&mut errs, at(f), value);
            }
            same_order(&mut errs, at("order_id"), item.order_id.as_deref(), &id);
        }

        if self.payments.len() > MAX_PAYMENTS {
            errs.push("payments", format!("at most {MAX_PAYMENTS} payments"));
        }
        let mut seen = HashSet::with_capacity(self.payments.len());
        for (i, p) in self.payments.iter().enumerate() {
            if !seen.insert(p.id) {
                errs.push(
                    format!("payments[{i}].id"),
                    "duplicates another payment's id",
                );
            }
            payment(&mut errs, i, p);
            same_order(
                &mut errs,
                format!("payments[{i}].order_id"),
                p.order_id.as_deref(),
                &id,
            );
        }

        let id = match id {
            Some(id) if errs.0.is_empty() => id,
            _ => return Err(errs),
        };
        self.order.id = id.as_str().to_owned();
        for item in &mut self.items {
            item.order_id = Some(id.as_str().to_owned());
        }
        for p in &mut self.payments {
            p.order_id = Some(id.as_str().to_owned());
        }
        self.history.clear();
        Ok(ValidOrder { id, full: self })
    }
}

fn payment(errs: &mut ValidationErrors, i: usize, p: &Payment) {
    let at = |f: &str| format!("payments[{i}].{f}");
    if p.id.is_nil() {
        errs.push(at("id"), "must not be the nil UUID");
    }
    money(errs, at("sum"), p.sum);
    note(errs, at("info"), &p.info);
    text(
        errs,
        at("contract_number"),
        &p.contract_number,
        MAX_TEXT_LEN,
    );
    text(errs, at("external_id"), &p.external_id, MAX_TEXT_LEN);
    match (&p.credit_data, p.kind) {
        (None, PaymentType::Credit) => errs.push(at("credit_data"), "is required for credit"),
        (Some(_), kind) if kind != PaymentType::Credit => {
            errs.push(at("credit_data"), "is allowed only for credit")
        }
        (Some(c), _) => {
            text(errs, at("credit_data.bank"), &c.bank, MAX_TEXT_LEN);
            text(errs, at("credit_data.type"), &c.kind, MAX_TEXT_LEN);
            if !(1..=360).contains(&c.number_of_months) {
                errs.push(at("credit_data.number_of_months"), "must be 1 to 360");
            }
            money(
                errs,
                at("credit_data.pay_sum_per_month"),
                c.pay_sum_per_month,
            );
            if c.broker_id < 0 {
                errs.push(at("credit_data.broker_id"), "must not be negative");
            }
            let iin_ok = c.iin.is_empty()
                || (c.iin.len() == 12 && c.iin.bytes().all(|b| b.is_ascii_digit()));
            if !iin_ok {
                errs.push(at("credit_data.iin"), "must be empty or 12 digits");
            }
        }
        (None, _) => {}
    }
    if let Some(card) = &p.card_payment_data {
        if !p.kind.takes_card_data() {
            errs.push(
                at("card_payment_data"),
                "is allowed only for card and card_online",
            );
        }
        text(
            errs,
            at("card_payment_data.provider"),
            &card.provider,
            MAX_TEXT_LEN,
        );
        text(
            errs,
            at("card_payment_data.transaction_id"),
            &card.transaction_id,
            MAX_TEXT_LEN,
        );
    }
}

fn required(errs: &mut ValidationErrors, field: impl Into<String>, value: &str) {
    if value.trim().is_empty() {
        errs.push(field, "is required");
    }
}

/// Single-line text. PostgreSQL rejects NUL, and other control characters
/// only cause trouble downstream, so both are refused here.
fn text(errs: &mut ValidationErrors, field: impl Into<String>, value: &str, max: usize) {
    checked_text(errs, field, value, max, |_| false);
}

/// Free-form text: like [`text`], but tabs and line breaks are allowed.
fn note(errs: &mut ValidationErrors, field: impl Into<String>, value: &str) {
    checked_text(errs, field, value, MAX_NOTE_LEN, |c| {
        matches!(c, '\t' | '\n' | '\r')
    });
}

fn checked_text(
    errs: &mut ValidationErrors,
    field: impl Into<String>,
    value: &str,
    max: usize,
    allowed_control: fn(char) -> bool,
) {
    if value.chars().count() > max {
        errs.push(field, format!("must be at most {max} characters"));
    } else if value.chars().any(|c| c.is_control() && !allowed_control(c)) {
        errs.push(field, "must not contain control characters");
    }
}

fn money(errs: &mut ValidationErrors, field: impl Into<String>, value: Money) {
    if let Err(problem) = value.check() {
        errs.push(field, problem);
    }
}

fn same_order(
    errs: &mut ValidationErrors,
    field: impl Into<String>,
    given: Option<&str>,
    id: &Option<OrderId>,
) {
    if let (Some(given), Some(id)) = (given, id) {
        if given != id.as_str() {
            errs.push(field, "does not match the order's id");
        }
    }
}

/// A status change requested through `POST /orders/{id}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatusChange {
    /// The new status.
    #[schema(example = "paid")]
    pub status: String,
    /// Who makes the change.
    #[serde(default)]
    pub user_id: String,
}

impl StatusChange {
    /// Applies the same rules as a full save does to these fields.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        required(&mut errs, "status", &self.status);
        text(&mut errs, "status", &self.status, MAX_TEXT_LEN);
        text(&mut errs, "user_id", &self.user_id, MAX_TEXT_LEN);
        errs.into_result(())
    }
}

#[cfg(test)]
#[path = "validation_tests.rs"]
mod tests;

/// Checks a user id taken from a header against the text rules.
pub fn validate_user_id(user_id: &str) -> Result<(), ValidationErrors> {
    let mut errs = ValidationErrors::default();
    text(&mut errs, "X-User-Id", user_id, MAX_TEXT_LEN);
    errs.into_result(())
}

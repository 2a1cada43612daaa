//! What a new order asks of the saga (issue: the order saga): the stock to
//! reserve and the account that pays. It rides on [`OrderFull`] as an
//! optional `checkout`, so clients that never send one see no change.
//!
//! [`OrderFull`]: crate::OrderFull

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One line to reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Line {
    /// The product, as inventory knows it.
    #[schema(example = "sku-1")]
    pub product_id: String,
    /// Units, at least 1.
    #[schema(example = 2)]
    pub quantity: i64,
}

/// What a new order asks of the saga: the stock to reserve and the account
/// that pays `order.price`. An order saved without it has no saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Checkout {
    /// The paying customer's account in payments.
    #[schema(example = "acc-1")]
    pub account_id: String,
    /// The stock to reserve, each product once; all or nothing.
    pub reserve: Vec<Line>,
}

/// Most lines one reservation may hold.
pub const MAX_LINES: usize = 100;
/// Most units of one line.
pub const MAX_QUANTITY: i64 = 1_000_000;

impl Checkout {
    /// What is wrong with it, as `(field, message)` under `checkout`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(m) = check_name(&self.account_id) {
            out.push(("checkout.account_id".into(), m));
        }
        if self.reserve.is_empty() {
            out.push((
                "checkout.reserve".into(),
                "must name at least one line".into(),
            ));
        } else if self.reserve.len() > MAX_LINES {
            out.push((
                "checkout.reserve".into(),
                format!("at most {MAX_LINES} lines"),
            ));
        }
        out.extend(line_problems(&self.reserve, "checkout.reserve"));
        out
    }
}

/// What is wrong with each of `lines`, as `(field, message)` with fields
/// named `<at>[i].…`; shared by the checkout and the `ReserveStock` message.
pub fn line_problems(lines: &[Line], at: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        if let Err(m) = check_name(&line.product_id) {
            out.push((format!("{at}[{i}].product_id"), m));
        } else if !seen.insert(line.product_id.as_str()) {
            out.push((
                format!("{at}[{i}].product_id"),
                "names a product already reserved above".into(),
            ));
        }
        if !(1..=MAX_QUANTITY).contains(&line.quantity) {
            out.push((
                format!("{at}[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
    }
    out
}

/// Product and account ids: 1-64 of `A-Z a-z 0-9 - _ .`, so they are safe
/// in URLs, logs and queue names.
pub fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err("must be 1-64 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("may hold only A-Z a-z 0-9 - _ .".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkout_names_each_problem_by_field() {
        let checkout = Checkout {
            account_id: String::new(),
            reserve: vec![
                Line {
                    product_id: "p".into(),
                    quantity: 0,
                },
                Line {
                    product_id: "p".into(),
                    quantity: 1,
                },
            ],
        };
        let fields: Vec<String> = checkout.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "checkout.account_id",
                "checkout.reserve[0].quantity",
                "checkout.reserve[1].product_id"
            ]
        );
    }
}

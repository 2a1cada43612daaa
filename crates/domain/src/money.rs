//! Money: an exact decimal end to end. PostgreSQL keeps it as
//! `NUMERIC(15,2)`, Rust as a [`Decimal`], and the wire as a JSON number
//! written and read digit for digit (serde_json's `arbitrary_precision`),
//! never through a binary float, so sums add up to the cent.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// An amount of money. Any decimal parses; [`Money::check`] says whether it
/// is a valid amount (validation reports it per field).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub Decimal);

impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .minimum(Some(0))
            .exclusive_maximum(Some(1e13))
            // No `multipleOf: 0.01`: validators test it in binary floating
            // point, where 150.5 is not a multiple of 0.01.
            .description(Some(
                "An exact amount: a JSON number with at most two decimal places.",
            ))
            .into()
    }
}

impl ToSchema for Money {}

/// Amounts must stay below this: `NUMERIC(15,2)` holds 13 integer digits.
pub const MAX_MONEY: Decimal = Decimal::from_parts(1316134912, 2328, 0, false, 0); // 1e13

impl Money {
    /// Zero.
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// Why this is not a valid amount, if it is not: negative, too large,
    /// or finer than a cent.
    pub fn check(self) -> Result<(), String> {
        if self.0.is_sign_negative() && !self.0.is_zero() {
            Err("must not be negative".into())
        } else if self.0 >= MAX_MONEY {
            Err("must be less than 1e13".into())
        } else if self.0.normalize().scale() > 2 {
            Err("must have at most two decimal places".into())
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.normalize().fmt(f)
    }
}

impl FromStr for Money {
    type Err = rust_decimal::Error;

    /// Plain (`12.50`) or scientific (`1.25e1`) notation, exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(['e', 'E']) {
            Decimal::from_scientific(s).map(Money)
        } else {
            Decimal::from_str_exact(s).map(Money)
        }
    }
}

impl From<Decimal> for Money {
    fn from(d: Decimal) -> Self {
        Money(d)
    }
}

impl Serialize for Money {
    /// A JSON number with no trailing zeros, e.g. `150.5`, `0.3`, `100`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let number = serde_json::Number::from_str(&self.to_string())
            .map_err(|e| serde::ser::Error::custom(format!("{self} as a JSON number: {e}")))?;
        number.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    /// A JSON number, read digit for digit.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        number
            .to_string()
            .parse()
            .map_err(|e| D::Error::custom(format!("{number} is not an amount: {e}")))
    }
}

impl From<Money> for serde_json::Value {
    fn from(m: Money) -> Self {
        serde_json::to_value(m).expect("money serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn money(s: &str) -> Money {
        s.parse().unwrap()
    }

    #[test]
    fn sums_are_exact_where_floats_are_not() {
        let sum = Money(money("0.1").0 + money("0.2").0);
        assert_eq!(sum, money("0.3"));
        assert_eq!(serde_json::to_string(&sum).unwrap(), "0.3");
    }

    #[test]
    fn the_largest_amount_round_trips_digit_for_digit() {
        let max: Money = serde_json::from_str("9999999999999.99").unwrap();
        assert_eq!(max.0.to_string(), "9999999999999.99");
        assert_eq!(serde_json::to_string(&max).unwrap(), "9999999999999.99");
        assert_eq!(max.check(), Ok(()));
        let value: serde_json::Value =
            serde_json::from_str(r#"{"price": 9999999999999.99}"#).unwrap();
        let back: Money = serde_json::from_value(value["price"].clone()).unwrap();
        assert_eq!(back, max);
    }

    #[test]
    fn amounts_are_written_without_trailing_zeros() {
        for (input, written) in [
            ("150.50", "150.5"),
            ("100.00", "100"),
            ("0", "0"),
            ("1.5e2", "150"),
        ] {
            assert_eq!(serde_json::to_string(&money(input)).unwrap(), written);
        }
        assert_eq!(serde_json::to_value(money("150.50")).unwrap(), json!(150.5));
    }

    #[test]
    fn only_non_negative_cents_below_1e13_are_valid_amounts() {
        assert_eq!(money("-0.01").check(), Err("must not be negative".into()));
        assert_eq!(
            money("0.001").check(),
            Err("must have at most two decimal places".into())
        );
        assert_eq!(money("0.010").check(), Ok(()));
        assert_eq!(
            money("10000000000000").check(),
            Err("must be less than 1e13".into())
        );
        assert_eq!(money("-0").check(), Ok(()));
        assert!(
            serde_json::from_str::<Money>(r#""12.5""#).is_err(),
            "a string is not a number"
        );
    }
}

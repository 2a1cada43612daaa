use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::order::OrderFull;

fn sample() -> serde_json::Value {
    json!({
        "order": {
            "id": "ORD-1", "type": "delivery", "status": "new", "city": "Almaty",
            "subdivision": "A1", "price": 150.5, "platform": "web",
            "general_id": "0190a6f6-2a9b-7c1e-9f6a-3c1f2d4e5b6a",
            "order_number": "N-1", "executor": "courier-7"
        },
        "items": [
            {"product_id": "P-1", "base_price": 100.0, "price": 90.5, "gift": false},
            {"product_id": "P-2", "base_price": 60.0, "price": 60.0}
        ],
        "payments": [
            {"id": "0190a6f6-2a9b-7c1e-9f6a-000000000001", "type": "card_online", "sum": 100.0,
             "card_payment_data": {"provider": "visa", "transaction_id": "T1"}},
            {"id": "0190a6f6-2a9b-7c1e-9f6a-000000000002", "type": "credit", "sum": 50.5,
             "credit_data": {"bank": "B", "type": "installment", "number_of_months": 12,
                             "pay_sum_per_month": 4.21, "broker_id": 3, "iin": "990101300123"}}
        ]
    })
}

fn parse(v: serde_json::Value) -> OrderFull {
    serde_json::from_value(v).expect("sample deserializes")
}

fn fields(e: ValidationErrors) -> Vec<String> {
    e.0.into_iter().map(|f| f.field).collect()
}

fn target(id: &str) -> OrderId {
    OrderId::parse(id).unwrap()
}

#[test]
fn a_complete_order_is_valid_and_gets_its_id_stamped_on_lines() {
    let valid = parse(sample()).validate(Some(&target("ORD-1"))).unwrap();
    assert_eq!(valid.id().as_str(), "ORD-1");
    assert!(valid
        .get()
        .items
        .iter()
        .all(|i| i.order_id.as_deref() == Some("ORD-1")));
    assert!(valid
        .get()
        .payments
        .iter()
        .all(|p| p.order_id.as_deref() == Some("ORD-1")));
}

#[test]
fn the_path_id_fills_an_empty_body_id() {
    let mut v = sample();
    v["order"]["id"] = json!("");
    let valid = parse(v).validate(Some(&target("ORD-9"))).unwrap();
    assert_eq!(valid.get().order.id, "ORD-9");
}

#[test]
fn a_body_id_that_differs_from_the_path_is_rejected() {
    let err = parse(sample())
        .validate(Some(&target("ORD-2")))
        .unwrap_err();
    assert_eq!(fields(err), ["order.id"]);
}

#[test]
fn create_without_an_id_generates_one() {
    let mut v = sample();
    v["order"].as_object_mut().unwrap().remove("id");
    let valid = parse(v).validate(None).unwrap();
    assert!(OrderId::parse(valid.id().as_str()).is_ok());
    assert_eq!(valid.id().as_str().len(), 36);
}

#[test]
fn every_broken_rule_is_reported_at_once() {
    let mut v = sample();
    v["order"]["status"] = json!(" ");
    v["order"]["price"] = json!(-1.0);
    v["items"][1]["product_id"] = json!("");
    v["items"][0]["price"] = json!(1.005);
    v["payments"][1]["credit_data"]["iin"] = json!("12ab");
    let err = parse(v).validate(Some(&target("ORD-1"))).unwrap_err();
    assert_eq!(
        fields(err),
        [
            "order.status",
            "order.price",
            "items[0].price",
            "items[1].product_id",
            "payments[1].credit_data.iin",
        ]
    );
}

#[test]
fn payment_details_must_fit_the_payment_type() {
    let mut v = sample();
    v["payments"][0]["type"] = json!("cash_at_shop");
    v["payments"][1]
        .as_object_mut()
        .unwrap()
        .remove("credit_data");
    let err = parse(v).validate(None).unwrap_err();
    assert_eq!(
        fields(err),
        ["payments[0].card_payment_data", "payments[1].credit_data"]
    );
}

#[test]
fn duplicate_payment_ids_and_foreign_order_ids_are_rejected() {
    let mut v = sample();
    v["payments"][1]["id"] = v["payments"][0]["id"].clone();
    v["items"][0]["order_id"] = json!("OTHER");
    let err = parse(v).validate(None).unwrap_err();
    assert_eq!(fields(err), ["items[0].order_id", "payments[1].id"]);
}

#[test]
fn nul_bytes_and_overlong_text_are_rejected() {
    let mut v = sample();
    v["order"]["city"] = json!("Alma\u{0}ty");
    v["order"]["executor"] = json!("x".repeat(MAX_TEXT_LEN + 1));
    let err = parse(v).validate(None).unwrap_err();
    assert_eq!(fields(err), ["order.city", "order.executor"]);
}

#[test]
fn unknown_payment_types_do_not_deserialize() {
    let mut v = sample();
    v["payments"][0]["type"] = json!("barter");
    assert!(serde_json::from_value::<OrderFull>(v).is_err());
}

#[test]
fn history_sent_by_a_client_is_ignored() {
    let mut v = sample();
    v["history"] = json!([{"type": "status", "value": "forged"}]);
    assert!(parse(v).history.is_empty());
}

#[test]
fn order_ids_reject_traversal_and_odd_characters() {
    for bad in ["", "../etc", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
        assert!(OrderId::parse(bad).is_err(), "{bad:?} should be rejected");
    }
    for good in ["ORD-1", "a.b_c-9", &"x".repeat(64)] {
        assert!(OrderId::parse(good).is_ok(), "{good:?} should be accepted");
    }
}

#[test]
fn status_changes_need_a_status() {
    let change = StatusChange {
        status: "".into(),
        user_id: "u".into(),
    };
    assert_eq!(fields(change.validate().unwrap_err()), ["status"]);
}

proptest! {
    #[test]
    fn money_is_valid_exactly_when_it_is_a_non_negative_whole_number_of_cents(
        units in -1_000_000_000_000_000i64..1_000_000_000_000_000i64,
        scale in 0u32..5,
    ) {
        // `units` at `scale` decimal places, written as JSON text: no float
        // on the way in, and an exact oracle.
        let text = rust_decimal::Decimal::new(units, scale).to_string();
        let mut v = sample();
        v["order"]["price"] = serde_json::from_str(&text).unwrap();
        let in_cents = units.abs() % 10i64.pow(scale.saturating_sub(2)) == 0;
        let below_max = units.unsigned_abs() < 10u64.pow(13 + scale);
        let valid = units >= 0 && in_cents && below_max;
        prop_assert_eq!(parse(v).validate(None).is_ok(), valid, "{}", text);
    }

    #[test]
    fn order_ids_from_the_allowed_alphabet_parse(s in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}") {
        let id = OrderId::parse(&s).unwrap();
        prop_assert_eq!(id.as_str(), s.as_str());
    }

    #[test]
    fn validation_never_panics_on_arbitrary_text(s in any::<String>()) {
        let mut v = sample();
        v["order"]["status"] = json!(s.clone());
        v["order"]["city"] = json!(s.clone());
        v["items"][0]["product_id"] = json!(s);
        let _ = parse(v).validate(None);
    }
}

use serde_json::{json, Value};

/// A complete, valid OrderFull body with 3 items and 2 payments.
pub fn sample_order(id: &str) -> Value {
    sample_order_with(id, "new", 150.5)
}

/// [`sample_order`] with the given status and price.
pub fn sample_order_with(id: &str, status: &str, price: f64) -> Value {
    json!({
        "order": {
            "id": id, "type": "delivery", "status": status, "city": "Almaty",
            "subdivision": "ALM-01", "price": price, "platform": "web",
            "general_id": "0190a6f6-2a9b-7c1e-9f6a-3c1f2d4e5b6a",
            "order_number": format!("N-{id}"), "executor": "courier-7"
        },
        "items": [
            {"product_id": "P-1", "external_id": "L-1", "status": "reserved", "base_price": 100.0,
             "price": 90.5, "earned_bonuses": 1.5, "spent_bonuses": 0.0, "gift": false,
             "owner_id": "u-1", "delivery_id": "d-1", "shop_assistant": "sa-1", "warehouse": "W1"},
            {"product_id": "P-2", "base_price": 40.0, "price": 40.0},
            {"product_id": "P-3", "base_price": 20.0, "price": 20.0, "gift": true}
        ],
        "payments": [
            {"id": "0190a6f6-2a9b-7c1e-9f6a-000000000001", "type": "card_online", "sum": 100.0,
             "payed": true, "card_payment_data": {"provider": "visa", "transaction_id": "T1"}},
            {"id": "0190a6f6-2a9b-7c1e-9f6a-000000000002", "type": "credit", "sum": 50.5,
             "contract_number": "C-9",
             "credit_data": {"bank": "Halyk", "type": "installment", "number_of_months": 12,
                             "pay_sum_per_month": 4.21, "broker_id": 3, "iin": "990101300123"}}
        ]
    })
}

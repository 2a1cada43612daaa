//! Integration tests of the store on real PostgreSQL, one database per test.

mod batch_save;
mod claims;
mod coalescing;
mod in_order;
mod log;
mod outbox;
mod upgrade;
mod upkeep;

/// A plan as `EXPLAIN (ANALYZE, FORMAT JSON)` answers it.
pub type Plan = sqlx::types::Json<serde_json::Value>;

/// `sql` under `EXPLAIN (ANALYZE, FORMAT JSON)`, to bind and fetch as a
/// [`Plan`].
pub fn explained(sql: &str) -> String {
    format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
}

/// Rows the scans of `outbox` in `plan` read, kept or filtered out.
pub fn rows_read(plan: &Plan) -> f64 {
    outbox_rows(&plan.0[0]["Plan"])
}

fn outbox_rows(node: &serde_json::Value) -> f64 {
    let scans_outbox = node["Relation Name"] == "outbox" && node["Node Type"] != "ModifyTable";
    let own = if scans_outbox {
        let n = |k: &str| node[k].as_f64().unwrap_or(0.0);
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
            * n("Actual Loops")
    } else {
        0.0
    };
    let children = node["Plans"].as_array().into_iter().flatten();
    own + children.map(outbox_rows).sum::<f64>()
}

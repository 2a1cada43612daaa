//! Integration tests of the store on real PostgreSQL, one database per test.

mod batch_save;
mod claims;
mod in_order;
mod outbox;
mod upgrade;
mod upkeep;

/// Rows the scans of `outbox` in an `EXPLAIN (ANALYZE, FORMAT JSON)` plan
/// read, kept or filtered out.
pub fn rows_read(node: &serde_json::Value) -> f64 {
    let scans_outbox = node["Relation Name"] == "outbox" && node["Node Type"] != "ModifyTable";
    let own = if scans_outbox {
        let n = |k: &str| node[k].as_f64().unwrap_or(0.0);
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
            * n("Actual Loops")
    } else {
        0.0
    };
    let children = node["Plans"].as_array().into_iter().flatten();
    own + children.map(rows_read).sum::<f64>()
}

//! The `OutboxRelay` type: its spec is what an operator may change on a
//! running relay, its status what the leading relay reports. The CRD is
//! generated from these types ([`crd_yaml`], `orders-center crdgen`).

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use kube::core::CustomResourceExt;
use kube::CustomResource;
use relay::Settings;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use worker::BreakerConfig;

/// One destination of the relays, steered from the cluster. Unset fields
/// leave the relay's flags in force.
// The lint reads each `printcolumn(type_ = …)` as a repeat of the one before.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "orders-center.io",
    version = "v1alpha1",
    kind = "OutboxRelay",
    doc = "The relays' delivery to one outbox destination: paused or not, its limits, and how it stands.",
    namespaced,
    shortname = "obr",
    category = "orders-center",
    status = "OutboxRelayStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Destination",
        type_ = "string",
        json_path = ".spec.destination"
    ),
    printcolumn(name = "Paused", type_ = "boolean", json_path = ".spec.paused"),
    printcolumn(
        name = "Backlog",
        type_ = "integer",
        json_path = ".status.backlog",
        description = "Tasks (or log events) not delivered yet"
    ),
    printcolumn(
        name = "Oldest",
        type_ = "date",
        json_path = ".status.oldestPending",
        description = "Age of the oldest of them"
    ),
    printcolumn(name = "Dead", type_ = "integer", json_path = ".status.dead"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(
        name = "Breaker",
        type_ = "string",
        json_path = ".status.breaker",
        description = "The worst circuit breaker of any relay"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelaySpec {
    /// The outbox destination steered: `onec`, `kafka`, `rabbitmq` or
    /// `journal` (the PostgreSQL transport).
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9][a-z0-9_.-]*$"))]
    pub destination: String,
    /// Stop claiming for this destination; deliveries in flight finish.
    #[serde(default)]
    pub paused: bool,
    /// Requests per second from each relay; 0 for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub rate_limit: Option<u32>,
    /// Most requests in flight from each relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<u32>,
    /// Most tasks (or log events) one claim takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: Option<u32>,
    /// The circuit breaker in front of the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerSpec>,
}

/// The circuit breaker's thresholds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BreakerSpec {
    /// Consecutive failures that open it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub failure_threshold: Option<u32>,
    /// How long it stays open before one probe, e.g. `30s` or `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(ms|s|m|h)$"))]
    pub cool_down: Option<String>,
}

/// What the leading relay last saw of the destination.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// The spec's generation this status was written under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The relay that leads, and writes this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The worst circuit breaker of any relay: `Closed`, `HalfOpen` or
    /// `Open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<String>,
    /// Each relay's circuit breaker, as it reported within 15 s.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub breakers: BTreeMap<String, String>,
    /// Tasks (or log events) not delivered yet, as of the leader's last
    /// recount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// Tasks (or log events) that failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead: Option<i64>,
    /// When the oldest of the backlog was written; absent when none waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending: Option<String>,
    /// When something last reached the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery: Option<String>,
    /// For a destination read from the log: how far its cursors are behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_lag: Option<CursorLagStatus>,
    /// For a destination read from the log: how many partitions each relay
    /// claimed last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, u32>,
    /// When the recount was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_at: Option<String>,
    /// `Ready`, `Degraded` and `Paused`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The log cursors' lag, over every partition.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CursorLagStatus {
    /// Committed events no cursor has passed yet, summed over partitions.
    pub events: i64,
    /// How long the oldest of them has waited, in whole seconds.
    pub seconds: i64,
}

/// A standard condition, as `metav1.Condition`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Degraded` or `Paused`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Why, in one CamelCase word.
    pub reason: String,
    /// Why, for people.
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: String,
    /// The spec's generation it was set under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD as YAML, as `orders-center crdgen` prints it and the chart
/// ships it in `crds/`.
pub fn crd_yaml() -> String {
    // Straight to YAML: through serde_json's `Value` (arbitrary precision,
    // for money) numbers would come out as its private representation.
    let yaml = serde_saphyr::to_string(&OutboxRelay::crd()).expect("a CRD serializes");
    format!("# Generated by `orders-center crdgen`: do not edit.\n{yaml}")
}

/// The settings `spec` asks for, over the relay's `flags` for what it
/// leaves unset. A cool-down the schema let through but that does not
/// parse keeps the flag's.
pub fn settings(spec: &OutboxRelaySpec, flags: Settings) -> Settings {
    let mut s = flags;
    s.paused = spec.paused;
    if let Some(n) = spec.batch_size {
        s.batch_size = n.max(1);
    }
    if let Some(n) = spec.max_in_flight {
        s.protection.max_in_flight = n.max(1) as usize;
    }
    if let Some(rate) = spec.rate_limit {
        s.protection.rate_per_second = NonZeroU32::new(rate);
    }
    if let Some(breaker) = &spec.breaker {
        let BreakerConfig {
            failure_threshold,
            cool_down,
        } = flags.protection.breaker;
        s.protection.breaker = BreakerConfig {
            failure_threshold: breaker
                .failure_threshold
                .unwrap_or(failure_threshold)
                .max(1),
            cool_down: breaker
                .cool_down
                .as_deref()
                .and_then(|d| humantime::parse_duration(d).ok())
                .unwrap_or(cool_down),
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use relay::ProtectionConfig;

    fn version() -> serde_json::Value {
        let crd = serde_json::to_value(OutboxRelay::crd()).unwrap();
        crd["spec"]["versions"][0].clone()
    }

    #[test]
    fn the_crd_has_a_status_subresource_and_the_printer_columns() {
        let v = version();
        assert_eq!(v["name"], "v1alpha1");
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        let columns: Vec<(String, String, String)> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap().to_owned();
                (s("name"), s("type"), s("jsonPath"))
            })
            .collect();
        let expected = [
            ("Destination", "string", ".spec.destination"),
            ("Paused", "boolean", ".spec.paused"),
            ("Backlog", "integer", ".status.backlog"),
            ("Oldest", "date", ".status.oldestPending"),
            ("Dead", "integer", ".status.dead"),
            ("Leader", "string", ".status.leader"),
            ("Breaker", "string", ".status.breaker"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
            .collect();
        assert_eq!(columns, expected);
        let crd = OutboxRelay::crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["obr".to_owned()]));
        assert_eq!(crd.spec.scope, "Namespaced");
    }

    #[test]
    fn the_schema_refuses_a_negative_rate_limit_and_a_zero_batch() {
        let spec = &version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["rateLimit"]["type"], "integer");
        assert_eq!(spec["rateLimit"]["minimum"].as_f64(), Some(0.0));
        assert_eq!(spec["batchSize"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(spec["maxInFlight"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(
            spec["breaker"]["properties"]["failureThreshold"]["minimum"].as_f64(),
            Some(1.0)
        );
        // And the relay's own reading of a resource written past the schema.
        let negative = serde_json::json!({"destination": "onec", "rateLimit": -1});
        assert!(serde_json::from_value::<OutboxRelaySpec>(negative).is_err());
    }

    #[test]
    fn the_chart_ships_the_generated_crd() {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../charts/orders-center/crds/outboxrelays.yaml");
        let shipped = std::fs::read_to_string(&shipped).unwrap();
        assert!(
            shipped == crd_yaml(),
            "charts/orders-center/crds/outboxrelays.yaml differs from the generated CRD: \
             run `cargo run -q --bin orders-center -- crdgen > charts/orders-center/crds/outboxrelays.yaml`"
        );
    }

    #[test]
    fn a_spec_overrides_the_flags_it_sets_and_only_those() {
        let flags = Settings {
            paused: false,
            batch_size: 100,
            protection: ProtectionConfig {
                max_in_flight: 64,
                rate_per_second: NonZeroU32::new(200),
                breaker: BreakerConfig {
                    failure_threshold: 5,
                    cool_down: Duration::from_secs(10),
                },
            },
        };
        let bare = OutboxRelaySpec {
            destination: "onec".into(),
            ..OutboxRelaySpec::default()
        };
        assert_eq!(settings(&bare, flags), flags);
        let full = OutboxRelaySpec {
            destination: "onec".into(),
            paused: true,
            rate_limit: Some(0),
            max_in_flight: Some(4),
            batch_size: Some(10),
            breaker: Some(BreakerSpec {
                failure_threshold: None,
                cool_down: Some("2m".into()),
            }),
        };
        assert_eq!(
            settings(&full, flags),
            Settings {
                paused: true,
                batch_size: 10,
                protection: ProtectionConfig {
                    max_in_flight: 4,
                    rate_per_second: None,
                    breaker: BreakerConfig {
                        failure_threshold: 5,
                        cool_down: Duration::from_secs(120),
                    },
                },
            },
            "rate 0 lifts the limit; an unset threshold keeps the flag's"
        );
    }
}

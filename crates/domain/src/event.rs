//! What an order save yields for the outbox: domain events, the destinations
//! that receive them, and how each destination wants them delivered.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The aggregate type of order events (Debezium's `aggregatetype`).
pub const ORDER_AGGREGATE: &str = "order";

/// What happened to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OrderEvent {
    /// Version 1 was saved. Payload: the OrderFull snapshot.
    #[serde(rename = "order.created")]
    Created,
    /// A later version was saved. Payload: the OrderFull snapshot; the
    /// notice carries `previous_status` when the status changed.
    #[serde(rename = "order.updated")]
    Updated,
    /// Not an event of its own since one version yields one event: in a
    /// route, it selects the updates whose status changed; in a notice, it
    /// is the old shape (a second event of the same version), still read.
    #[serde(rename = "order.status_changed")]
    StatusChanged,
}

impl OrderEvent {
    /// Every event.
    pub const ALL: [OrderEvent; 3] = [Self::Created, Self::Updated, Self::StatusChanged];

    /// The outbox `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "order.created",
            Self::Updated => "order.updated",
            Self::StatusChanged => "order.status_changed",
        }
    }

    /// Parses the outbox `type`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// The one event a save yields: created for version 1, updated after.
    pub fn of_save(previous_status: Option<&str>) -> OrderEvent {
        match previous_status {
            None => Self::Created,
            Some(_) => Self::Updated,
        }
    }
}

impl FromStr for OrderEvent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| {
            format!(
                "unknown event {s:?}; known: {}",
                Self::ALL.map(Self::as_str).join(", ")
            )
        })
    }
}

/// What an event stream (Kafka, RabbitMQ, a consumer in PostgreSQL) gets for
/// every order event: seed 001's order message, extended with the version
/// and the event. 1C gets whole snapshots instead (see
/// [`Destination::takes_snapshots`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderNotice {
    /// The event id, the same on every copy: a consumer's inbox key.
    pub idempotent_key: uuid::Uuid,
    /// The order.
    pub order_id: String,
    /// The order version the event belongs to.
    pub version: i64,
    /// The order's status at that version.
    pub status: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: OrderEvent,
    /// The status of the version before, on an update that changed it:
    /// what a consumer of status changes filters on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<String>,
    /// When the save committed (within the transaction's clock).
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

impl OrderNotice {
    /// Checks what a consumer must not apply: an empty order id, a version
    /// below 1, an empty status.
    pub fn check(&self) -> Result<(), String> {
        if self.order_id.is_empty() {
            return Err("order_id must not be empty".into());
        }
        if self.version < 1 {
            return Err(format!("version must be at least 1, got {}", self.version));
        }
        if self.status.is_empty() {
            return Err("status must not be empty".into());
        }
        Ok(())
    }
}

impl fmt::Display for OrderEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A destination's name as the outbox stores it: lowercase ASCII letters,
/// digits, `-` and `_`, 1 to 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
pub struct Destination(String);

/// 1C, the ERP: the destination every order version goes to by default.
pub const ONEC: &str = "onec";

impl Destination {
    /// 1C.
    pub fn onec() -> Self {
        Self(ONEC.to_owned())
    }

    /// Whether it gets OrderFull snapshots (1C) rather than
    /// [`OrderNotice`]s (every event stream).
    pub fn takes_snapshots(&self) -> bool {
        self.0 == ONEC
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let ok = (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a destination name: use 1 to 63 of a-z, 0-9, '-' and '_'"
            ))
        }
    }
}

impl TryFrom<String> for Destination {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Destination> for String {
    fn from(d: Destination) -> String {
        d.0
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a destination wants one key's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryPolicy {
    /// Each message is a whole snapshot: only the newest pending one of a key
    /// is sent, older ones are superseded (1C).
    LatestWins,
    /// Every message is sent, one key's strictly in the order written;
    /// nothing is superseded (event streams).
    EveryMessageInOrder,
}

/// Which destinations receive which order events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes(BTreeMap<OrderEvent, Vec<Destination>>);

impl Default for Routes {
    /// Every version to 1C, as before destinations existed.
    fn default() -> Self {
        Self::none()
            .with(OrderEvent::Created, Destination::onec())
            .with(OrderEvent::Updated, Destination::onec())
    }
}

impl Routes {
    /// No event goes anywhere.
    pub fn none() -> Self {
        Self(BTreeMap::new())
    }

    /// Also sends `event` to `destination`.
    pub fn with(mut self, event: OrderEvent, destination: Destination) -> Self {
        let to = self.0.entry(event).or_default();
        if !to.contains(&destination) {
            to.push(destination);
        }
        self
    }

    /// The destinations of `event`.
    pub fn destinations(&self, event: OrderEvent) -> &[Destination] {
        self.0.get(&event).map_or(&[], Vec::as_slice)
    }

    /// Where the one event of a save goes: the destinations of `event`,
    /// and, when the status changed, those routed `order.status_changed`.
    /// Each once.
    pub fn of_save(&self, event: OrderEvent, status_changed: bool) -> Vec<&Destination> {
        let mut to: Vec<&Destination> = self.destinations(event).iter().collect();
        if status_changed {
            for d in self.destinations(OrderEvent::StatusChanged) {
                if !to.contains(&d) {
                    to.push(d);
                }
            }
        }
        to
    }

    /// Every destination some event goes to.
    pub fn all_destinations(&self) -> Vec<Destination> {
        let mut all: Vec<Destination> = self.0.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        all
    }
}

impl FromStr for Routes {
    type Err = String;

    /// `destination=event,event;destination=event`, e.g.
    /// `onec=order.created,order.updated;kafka=order.created,order.updated,order.status_changed`.
    /// An empty string routes nothing.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut routes = Self::none();
        for route in s.split(';').map(str::trim).filter(|r| !r.is_empty()) {
            let (destination, events) = route
                .split_once('=')
                .ok_or_else(|| format!("route {route:?} is not destination=event,..."))?;
            let destination: Destination = destination.trim().parse()?;
            for event in events.split(',').map(str::trim) {
                let event: OrderEvent = event
                    .parse()
                    .map_err(|e| format!("{e} in route {route:?}"))?;
                routes = routes.with(event, destination.clone());
            }
        }
        Ok(routes)
    }
}

impl fmt::Display for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut by_destination: BTreeMap<&Destination, Vec<&str>> = BTreeMap::new();
        for (event, destinations) in &self.0 {
            for d in destinations {
                by_destination.entry(d).or_default().push(event.as_str());
            }
        }
        let parts: Vec<String> = by_destination
            .into_iter()
            .map(|(d, events)| format!("{d}={}", events.join(",")))
            .collect();
        f.write_str(&parts.join(";"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_sends_every_version_to_1c_and_round_trips_through_its_text() {
        let routes = Routes::default();
        assert_eq!(routes.to_string(), "onec=order.created,order.updated");
        assert_eq!(routes.to_string().parse::<Routes>().unwrap(), routes);
        assert!(routes.destinations(OrderEvent::StatusChanged).is_empty());
        assert_eq!(routes.all_destinations(), vec![Destination::onec()]);
    }

    #[test]
    fn routes_parse_several_destinations_and_refuse_unknown_events_and_names() {
        let routes: Routes = "onec=order.created,order.updated; kafka=order.status_changed"
            .parse()
            .unwrap();
        assert_eq!(
            routes.destinations(OrderEvent::StatusChanged),
            &["kafka".parse::<Destination>().unwrap()]
        );
        assert!("onec=order.deleted"
            .parse::<Routes>()
            .unwrap_err()
            .contains("order.deleted"));
        assert!("One C=order.created".parse::<Routes>().is_err());
        assert!("onec".parse::<Routes>().is_err());
        assert_eq!("".parse::<Routes>().unwrap(), Routes::none());
    }

    #[test]
    fn a_save_yields_one_event_and_status_change_routes_take_the_updates_that_change_it() {
        use OrderEvent::*;
        assert_eq!(OrderEvent::of_save(None), Created);
        assert_eq!(OrderEvent::of_save(Some("new")), Updated);
        let routes: Routes = "onec=order.updated; kafka=order.updated,order.status_changed; \
                              audit=order.status_changed"
            .parse()
            .unwrap();
        fn names(to: Vec<&Destination>) -> Vec<&str> {
            to.into_iter().map(Destination::as_str).collect()
        }
        assert_eq!(names(routes.of_save(Updated, false)), ["onec", "kafka"]);
        assert_eq!(
            names(routes.of_save(Updated, true)),
            ["onec", "kafka", "audit"],
            "kafka once, though routed both"
        );
        for e in OrderEvent::ALL {
            assert_eq!(OrderEvent::parse(e.as_str()), Some(e));
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
        }
    }

    #[test]
    fn a_notice_carries_the_previous_status_only_when_it_changed_and_the_old_shape_still_reads() {
        let mut notice = OrderNotice {
            idempotent_key: uuid::Uuid::nil(),
            order_id: "A-1".into(),
            version: 2,
            status: "paid".into(),
            kind: OrderEvent::Updated,
            previous_status: None,
            occurred_at: chrono::DateTime::UNIX_EPOCH,
        };
        let plain = serde_json::to_value(&notice).unwrap();
        assert!(plain.get("previous_status").is_none(), "{plain}");
        notice.previous_status = Some("new".into());
        let changed = serde_json::to_value(&notice).unwrap();
        assert_eq!(changed["previous_status"], "new");
        assert_eq!(
            serde_json::from_value::<OrderNotice>(changed).unwrap(),
            notice
        );
        let old: OrderNotice = serde_json::from_value(serde_json::json!({
            "idempotent_key": uuid::Uuid::nil(), "order_id": "A-1", "version": 2,
            "status": "paid", "type": "order.status_changed",
            "occurred_at": "2026-12-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(
            (old.kind, old.previous_status),
            (OrderEvent::StatusChanged, None)
        );
    }
}

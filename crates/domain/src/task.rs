//! Delivery tasks of the outbox (one per event and destination), as the API
//! reports them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Destination;

/// Where a delivery task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting to be claimed, possibly after a backoff (`run_at`).
    Pending,
    /// Claimed by a relay and being delivered.
    Running,
    /// Delivered.
    Done,
    /// Skipped because a newer version of the same order was delivered
    /// instead (only under the latest-wins policy).
    Superseded,
    /// Failed permanently or too many times; kept with its last error.
    Dead,
}

impl TaskState {
    /// Every state, in life order.
    pub const ALL: [TaskState; 5] = [
        Self::Pending,
        Self::Running,
        Self::Done,
        Self::Superseded,
        Self::Dead,
    ];

    /// The wire and database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Superseded => "superseded",
            Self::Dead => "dead",
        }
    }

    /// Parses the wire and database name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl TryFrom<String> for TaskState {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("unknown task state {s:?}"))
    }
}

/// A task as the API and the CLI list it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskSummary {
    /// Task id.
    pub id: i64,
    /// Where it goes.
    pub destination: Destination,
    /// The event, e.g. `order.updated`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Order id (the outbox's `aggregateid`).
    pub order_id: String,
    /// Order version carried.
    pub version: i64,
    /// State.
    pub state: TaskState,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// Earliest next attempt.
    pub run_at: DateTime<Utc>,
    /// Relay holding the claim, while running.
    pub claimed_by: Option<String>,
    /// Last delivery error.
    pub last_error: Option<String>,
    /// When the save committed.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// The 1C delivery state of an order's latest saved version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SyncStatus {
    /// The outbox task carrying that version.
    pub task_id: i64,
    /// The order version the task carries.
    pub version: i64,
    /// The task's state.
    pub state: TaskState,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// The last delivery error, if any.
    pub last_error: Option<String>,
    /// When the task last changed.
    pub updated_at: DateTime<Utc>,
}

/// Backlog figures of one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SyncStats {
    /// The destination counted.
    pub destination: Destination,
    /// Tasks waiting for delivery.
    pub pending: i64,
    /// Tasks being delivered right now.
    pub running: i64,
    /// Tasks that failed for good.
    pub dead: i64,
    /// Age of the oldest pending task in seconds; 0 when none is pending.
    pub oldest_pending_age_seconds: f64,
    /// When the counts were taken: by the leader relay's refresh, or now if
    /// no fresh refresh exists.
    pub refreshed_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert_eq!(TaskState::parse("lost"), None);
    }
}

//! The leading relay writes each `OutboxRelay`'s status (server-side apply
//! on the status subresource, under one field manager) from its backlog
//! recount, every relay's breaker and its identity; followers never do.
//! Every relay reports its breakers to the database for the leader, and
//! records a Kubernetes Event when its own breaker opens or closes; the new
//! leader records one when it takes over.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use domain::Destination;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Resource, ResourceExt};
use prometheus::IntCounterVec;
use relay::Controls;
use store::Backlog;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use worker::{BreakerState, Leader};

use crate::resource::{Condition, CursorLagStatus, OutboxRelay, OutboxRelayStatus};
use crate::spec_watch::{steering, Resources};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "orders-center-relay";

/// How often the writer looks again without being woken (the breaker's
/// lazy open → half-open is seen here).
const TICK: Duration = Duration::from_secs(1);

/// The longest a status write or an Event may take: a slow API server
/// delays the report, never the next one for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often every relay reports its breakers, besides on each change; a
/// report older than three of these is a relay that is gone.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// What the writer reads, all of it from the relay it runs in.
pub struct Sources {
    /// This relay's name.
    pub identity: String,
    /// Its destinations.
    pub controls: Vec<Arc<Controls>>,
    /// Who leads.
    pub leader: Arc<dyn Leader>,
    /// The leader's recounts.
    pub backlog: watch::Receiver<Option<Arc<Backlog>>>,
    /// The resources, from the spec watch.
    pub resources: watch::Receiver<Arc<Resources>>,
    /// Where every relay reports its breakers and the leader reads them
    /// all; without it the status shows the leader's breaker alone.
    pub store: Option<store::Store>,
}

/// Writes statuses and records Events.
pub struct StatusWriter {
    api: Api<OutboxRelay>,
    recorder: Recorder,
    sources: Sources,
    /// The status last written to each resource, so an unchanged one is
    /// not written again.
    written: BTreeMap<String, OutboxRelayStatus>,
    /// The resources this relay has announced its leadership on.
    announced: BTreeSet<String>,
    /// Each destination's breaker transitions, subscribed from the start.
    breakers: Vec<watch::Receiver<BreakerState>>,
}

fn counters() -> &'static (IntCounterVec, IntCounterVec) {
    static COUNTERS: OnceLock<(IntCounterVec, IntCounterVec)> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(prometheus::Opts::new(name, help), &[label])
                .expect("valid metric");
            prometheus::register(Box::new(c.clone())).expect("registered once");
            c
        };
        (
            counter(
                "orders_center_relay_status_writes_total",
                "OutboxRelay status patches this relay sent, by resource: only a leader sends any.",
                "resource",
            ),
            counter(
                "orders_center_relay_events_total",
                "Kubernetes Events this relay recorded, by reason.",
                "reason",
            ),
        )
    })
}

impl StatusWriter {
    /// A writer through `api` (the relays' namespace); Events are reported
    /// as `orders-center-relay` from `sources.identity`.
    pub fn new(api: Api<OutboxRelay>, sources: Sources) -> Self {
        let recorder = Recorder::new(
            api.clone().into_client(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(sources.identity.clone()),
            },
        );
        counters();
        let breakers = sources
            .controls
            .iter()
            .map(|c| c.breaker_changes())
            .collect();
        Self {
            api,
            recorder,
            sources,
            written: BTreeMap::new(),
            announced: BTreeSet::new(),
            breakers,
        }
    }

    /// Runs until `shutdown`. A failed write or Event is logged and tried
    /// again on the next change; it never stops the relay.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        let mut leading = self.sources.leader.subscribe();
        let mut breakers = std::mem::take(&mut self.breakers);
        let mut reported: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = changed(&mut self.sources.backlog) => {}
                () = changed(&mut self.sources.resources) => {}
                () = changed(&mut leading) => {}
                () = tokio::time::sleep(TICK) => {}
            }
            let mut changed_any = false;
            for (i, changes) in breakers.iter_mut().enumerate() {
                if changes.has_changed().unwrap_or(false) {
                    let state = *changes.borrow_and_update();
                    changed_any = true;
                    self.breaker_changed(i, state).await;
                }
            }
            if changed_any || reported.is_none_or(|at| at.elapsed() >= HEARTBEAT) {
                self.report_breakers().await;
                reported = Some(std::time::Instant::now());
            }
            if !self.sources.leader.is_leader() {
                // Seen, so a follower's loop waits for the next change.
                self.sources.backlog.borrow_and_update();
                self.sources.resources.borrow_and_update();
                self.announced.clear();
                self.written.clear();
                continue;
            }
            self.write_all().await;
        }
    }

    async fn breaker_changed(&self, index: usize, state: BreakerState) {
        let controls = &self.sources.controls[index];
        let destination = controls.destination().as_str();
        let (reason, type_, note) = match state {
            BreakerState::Open => (
                "BreakerOpened",
                EventType::Warning,
                format!(
                    "{}: the circuit breaker to {destination} opened after {} consecutive failures; deliveries wait {:?} before a probe",
                    self.sources.identity,
                    controls.settings().protection.breaker.failure_threshold,
                    controls.settings().protection.breaker.cool_down
                ),
            ),
            BreakerState::Closed => (
                "BreakerClosed",
                EventType::Normal,
                format!(
                    "{}: the circuit breaker to {destination} closed; deliveries flow",
                    self.sources.identity
                ),
            ),
            BreakerState::HalfOpen => return,
        };
        let resources = self.sources.resources.borrow().clone();
        if let Some((resource, _)) = steering(&resources, destination) {
            self.record(resource, reason, type_, note).await;
        }
    }

    /// Records this relay's breakers for the leader.
    async fn report_breakers(&self) {
        let Some(store) = &self.sources.store else {
            return;
        };
        let states: Vec<(&str, &str)> = self
            .sources
            .controls
            .iter()
            .map(|c| (c.destination().as_str(), c.breaker().name()))
            .collect();
        if let Err(e) = store.report_breakers(&self.sources.identity, &states).await {
            tracing::warn!(error = %e, "could not report this relay's breakers; the leader's status may miss them");
        }
    }

    /// Every relay's breaker per destination, as reported within three
    /// heartbeats, with this relay's own as of now.
    async fn fleet_breakers(&self) -> BTreeMap<String, BTreeMap<String, BreakerState>> {
        let mut fleet: BTreeMap<String, BTreeMap<String, BreakerState>> = BTreeMap::new();
        if let Some(store) = &self.sources.store {
            match store.breakers(HEARTBEAT * 3).await {
                Ok(rows) => {
                    for (destination, relay, state) in rows {
                        if let Some(state) = BreakerState::from_name(&state) {
                            fleet.entry(destination).or_default().insert(relay, state);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the relays' breakers; the status shows the leader's alone")
                }
            }
        }
        for c in &self.sources.controls {
            fleet
                .entry(c.destination().to_string())
                .or_default()
                .insert(self.sources.identity.clone(), c.breaker());
        }
        fleet
    }

    async fn write_all(&mut self) {
        let resources = self.sources.resources.borrow_and_update().clone();
        let backlog = self.sources.backlog.borrow_and_update().clone();
        let fleet = self.fleet_breakers().await;
        for controls in self.sources.controls.clone() {
            let Some((resource, _)) = steering(&resources, controls.destination().as_str()) else {
                continue;
            };
            let name = resource.name_any();
            if self.announced.insert(name.clone()) {
                let before = resource
                    .status
                    .as_ref()
                    .and_then(|s| s.leader.clone())
                    .filter(|l| *l != self.sources.identity);
                let note = match before {
                    Some(before) => format!(
                        "{} leads the relays of {} (after {before})",
                        self.sources.identity,
                        controls.destination()
                    ),
                    None => format!(
                        "{} leads the relays of {}",
                        self.sources.identity,
                        controls.destination()
                    ),
                };
                self.record(resource, "LeaderElected", EventType::Normal, note)
                    .await;
            }
            // What this relay wrote last is newer than what the watch has
            // brought back of it.
            let before = self.written.get(&name).or(resource.status.as_ref());
            let breakers = fleet
                .get(controls.destination().as_str())
                .cloned()
                .unwrap_or_default();
            let status = status_of(
                resource,
                before,
                controls.destination(),
                &Reporters {
                    leader: &self.sources.identity,
                    breakers,
                },
                backlog.as_deref(),
                Utc::now(),
            );
            if self.written.get(&name) == Some(&status) {
                continue;
            }
            // Leadership may have passed while this ran: check again right
            // before the write.
            if !self.sources.leader.is_leader() {
                return;
            }
            match tokio::time::timeout(CALL_TIMEOUT, self.patch(&name, &status)).await {
                Ok(Ok(())) => {
                    counters().0.with_label_values(&[&name]).inc();
                    self.written.insert(name, status);
                }
                Ok(Err(e)) => {
                    tracing::warn!(resource = %name, error = %e, "could not write the OutboxRelay status; trying again on the next change")
                }
                Err(_) => {
                    tracing::warn!(resource = %name, timeout = ?CALL_TIMEOUT, "the OutboxRelay status write timed out; trying again on the next change")
                }
            }
        }
    }

    async fn patch(&self, name: &str, status: &OutboxRelayStatus) -> kube::Result<()> {
        let body = serde_json::json!({
            "apiVersion": OutboxRelay::api_version(&()),
            "kind": OutboxRelay::kind(&()),
            "status": status,
        });
        self.api
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        Ok(())
    }

    async fn record(&self, resource: &OutboxRelay, reason: &str, type_: EventType, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Deliver".into(),
            secondary: None,
        };
        let reference = resource.object_ref(&());
        let publish = self.recorder.publish(&event, &reference);
        match tokio::time::timeout(CALL_TIMEOUT, publish).await {
            Ok(Ok(())) => counters().1.with_label_values(&[reason]).inc(),
            Ok(Err(e)) => {
                tracing::warn!(resource = %resource.name_any(), reason, error = %e, "could not record a Kubernetes Event")
            }
            Err(_) => {
                tracing::warn!(resource = %resource.name_any(), reason, timeout = ?CALL_TIMEOUT, "recording a Kubernetes Event timed out")
            }
        }
    }
}

/// Waits for a change; a channel whose sender is gone never changes again.
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Who reports: the leader, and each relay's breaker.
pub struct Reporters<'a> {
    /// The leader's name.
    pub leader: &'a str,
    /// Each relay's breaker of the destination.
    pub breakers: BTreeMap<String, BreakerState>,
}

impl Reporters<'_> {
    /// The worst breaker of any relay: open over half-open over closed.
    fn worst(&self) -> BreakerState {
        let severity = |s: &BreakerState| match s {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        };
        self.breakers
            .values()
            .copied()
            .max_by_key(severity)
            .unwrap_or(BreakerState::Closed)
    }

    /// The relays whose breaker is not closed.
    fn unwell(&self) -> Vec<&str> {
        self.breakers
            .iter()
            .filter(|(_, s)| **s != BreakerState::Closed)
            .map(|(r, _)| r.as_str())
            .collect()
    }
}

/// The status of `resource` as its leader sees it: the relays' breakers
/// (`Breaker` is the worst of them), and the figures of `backlog` (the
/// latest recount); without a recount yet, the figures stay as they were
/// `before`.
pub fn status_of(
    resource: &OutboxRelay,
    before: Option<&OutboxRelayStatus>,
    destination: &Destination,
    reporters: &Reporters<'_>,
    backlog: Option<&Backlog>,
    now: DateTime<Utc>,
) -> OutboxRelayStatus {
    let before = before.cloned().unwrap_or_default();
    let mut status = OutboxRelayStatus {
        observed_generation: resource.metadata.generation,
        leader: Some(reporters.leader.to_owned()),
        breaker: Some(reporters.worst().name().to_owned()),
        breakers: reporters
            .breakers
            .iter()
            .map(|(relay, s)| (relay.clone(), s.name().to_owned()))
            .collect(),
        ..before.clone()
    };
    let stats = backlog.and_then(|b| {
        b.destinations
            .iter()
            .find(|s| s.destination == *destination)
            .map(|s| (b, s))
    });
    if let Some((backlog, stats)) = stats {
        let counted = stats.refreshed_at;
        let waiting = stats.pending + stats.running;
        status.backlog = Some(waiting);
        status.dead = Some(stats.dead);
        status.oldest_pending = (waiting > 0).then(|| {
            let age =
                chrono::Duration::milliseconds((stats.oldest_pending_age_seconds * 1000.0) as i64);
            timestamp(counted - age)
        });
        status.last_delivery = backlog
            .last_delivery(destination.as_str())
            .map(timestamp)
            .or(before.last_delivery);
        status.counted_at = Some(timestamp(counted));
        let cursors: Vec<_> = backlog
            .cursors
            .iter()
            .filter(|c| c.destination == destination.as_str())
            .collect();
        if !cursors.is_empty() {
            let oldest = cursors.iter().filter_map(|c| c.oldest_at).min();
            status.cursor_lag = Some(CursorLagStatus {
                events: cursors.iter().map(|c| c.events).sum(),
                seconds: oldest.map_or(0, |o| (counted - o).num_seconds().max(0)),
            });
            status.partitions = BTreeMap::new();
            for owner in cursors.iter().filter_map(|c| c.owner.clone()) {
                *status.partitions.entry(owner).or_default() += 1;
            }
        }
    }
    status.conditions = conditions(
        resource,
        destination,
        reporters,
        &status,
        &before.conditions,
        now,
    );
    status
}

fn conditions(
    resource: &OutboxRelay,
    destination: &Destination,
    reporters: &Reporters<'_>,
    status: &OutboxRelayStatus,
    before: &[Condition],
    now: DateTime<Utc>,
) -> Vec<Condition> {
    let paused = resource.spec.paused;
    let breaker = reporters.worst();
    let unwell = reporters.unwell().join(", ");
    let dead = status.dead.unwrap_or(0);
    let [ready, degraded, paused_condition] = [
        match (paused, breaker) {
            (true, _) => (
                false,
                "Paused",
                format!("claims for {destination} are paused"),
            ),
            (false, BreakerState::Closed) => (
                true,
                "Delivering",
                format!("the relays deliver to {destination}"),
            ),
            (false, _) => (
                false,
                "BreakerOpen",
                format!("the circuit breaker to {destination} is {breaker:?} on {unwell}"),
            ),
        },
        match (breaker, dead) {
            (BreakerState::Closed, 0) => (
                false,
                "Healthy",
                "no open breaker and no dead letters".to_owned(),
            ),
            (BreakerState::Closed, n) => (
                true,
                "DeadLetters",
                format!("{n} dead: see `orders-center tasks list --state dead`"),
            ),
            (state, _) => (
                true,
                "BreakerOpen",
                format!("the circuit breaker is {state:?} on {unwell}"),
            ),
        },
        if paused {
            (
                true,
                "PausedBySpec",
                "spec.paused is true: no new claims".to_owned(),
            )
        } else {
            (false, "NotPaused", "spec.paused is false".to_owned())
        },
    ];
    [
        ("Ready", ready),
        ("Degraded", degraded),
        ("Paused", paused_condition),
    ]
    .into_iter()
    .map(|(type_, (on, reason, message))| {
        let value = if on { "True" } else { "False" };
        let since = before
            .iter()
            .find(|c| c.type_ == type_ && c.status == value)
            .map_or_else(|| timestamp(now), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: value.into(),
            reason: reason.into(),
            message,
            last_transition_time: since,
            observed_generation: resource.metadata.generation,
        }
    })
    .collect()
}

//! The saga's orchestrator: the consumer of inventory's and payments'
//! answers, and the leader's deadline scan. The transitions themselves are
//! the pure [`saga::transition`]; their SQL is `store::saga`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use domain::{Money, OrderId};
use inbox::{Handler, Incoming, Poison};
use saga::{Event, Kind, SagaMessage, Topic};
use sink::signing::Keyring;
use sqlx::PgConnection;
use store::saga::{Applied, Reply};
use store::Store;
use worker::{Job, JobError, Progress, Scope};

/// The consumer name in the inbox, and the local destination of answers.
pub const CONSUMER: &str = "saga";

/// The topics it reads.
pub const TOPICS: [Topic; 2] = [Topic::Reserve, Topic::Payment];

/// The saga's series, on the default registry: transitions by the state
/// they reach (in the orchestrator), and, from the leader's deadline scan,
/// passed deadlines and the sagas still running.
#[derive(Clone)]
pub struct SagaMetrics {
    moved: prometheus::IntCounterVec,
    ignored: prometheus::IntCounter,
    deadlines: prometheus::IntCounter,
    running: prometheus::IntGauge,
    oldest: prometheus::Gauge,
}

impl SagaMetrics {
    /// This process's series, registered once.
    pub fn get() -> &'static SagaMetrics {
        static METRICS: OnceLock<SagaMetrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let r = prometheus::default_registry();
            let metrics = SagaMetrics {
                moved: prometheus::IntCounterVec::new(
                    prometheus::Opts::new(
                        "orders_center_saga_transitions_total",
                        "Saga transitions applied, by the state reached.",
                    ),
                    &["state"],
                )
                .expect("valid"),
                ignored: prometheus::IntCounter::new(
                    "orders_center_saga_ignored_total",
                    "Answers a saga's state did not expect (late or repeated); nothing changed.",
                )
                .expect("valid"),
                deadlines: prometheus::IntCounter::new(
                    "orders_center_saga_deadlines_total",
                    "Saga steps whose answer did not come before the deadline.",
                )
                .expect("valid"),
                running: prometheus::IntGauge::new(
                    "orders_center_sagas_running",
                    "Sagas not yet completed or cancelled (the leader's last scan).",
                )
                .expect("valid"),
                oldest: prometheus::Gauge::new(
                    "orders_center_saga_oldest_running_seconds",
                    "Age of the oldest saga still running (the leader's last scan).",
                )
                .expect("valid"),
            };
            for c in [
                Box::new(metrics.moved.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(metrics.ignored.clone()),
                Box::new(metrics.deadlines.clone()),
                Box::new(metrics.running.clone()),
                Box::new(metrics.oldest.clone()),
            ] {
                r.register(c).expect("saga metrics register once");
            }
            for state in ["reserved", "paid", "completed", "compensating", "cancelled"] {
                metrics.moved.with_label_values(&[state]);
            }
            metrics
        })
    }
}

/// An answer with the id of the message that carried it, which the chain
/// records as the step's idempotency key.
#[derive(Debug, Clone)]
pub struct Answer {
    id: String,
    order: OrderId,
    event: Event,
    /// The command it answers, and what it names of it.
    command: Kind,
    in_reply_to: Option<String>,
    /// What a `PaymentSucceeded` says was charged.
    charged: Option<Money>,
}

/// Applies inventory's and payments' answers to their sagas.
pub struct Orchestrator {
    store: Store,
    keys: Keyring,
}

impl Orchestrator {
    /// Over the orders database of `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            keys: Keyring::default(),
        }
    }

    /// Requires the signature of `keys` on the answers' topics that have a
    /// key there.
    pub fn with_keys(mut self, keys: Keyring) -> Self {
        self.keys = keys;
        self
    }
}

#[async_trait::async_trait]
impl Handler for Orchestrator {
    type Message = Answer;

    fn decode(&self, incoming: &Incoming) -> Result<Answer, Poison> {
        let message: SagaMessage = inbox::saga::decode(&TOPICS, &self.keys, incoming)?;
        let no_answer = || Poison::new("unknown_type", format!("{} is no answer", message.kind));
        let event = Event::of(&message).ok_or_else(no_answer)?;
        let command = message.kind.answers().ok_or_else(no_answer)?;
        let order = OrderId::parse(&message.order_id).map_err(|e| Poison::new("invalid", e))?;
        Ok(Answer {
            id: incoming.id.clone().unwrap_or_default(),
            order,
            event,
            command,
            in_reply_to: message.in_reply_to,
            charged: (message.kind == Kind::PaymentSucceeded)
                .then_some(message.amount)
                .flatten(),
        })
    }

    fn ordering_key<'m>(&self, answer: &'m Answer) -> Option<&'m str> {
        Some(answer.order.as_str())
    }

    async fn apply(&self, conn: &mut PgConnection, answer: &Answer) -> sqlx::Result<()> {
        let applied = self
            .store
            .apply_saga_event(
                conn,
                &answer.order,
                &answer.event,
                &answer.id,
                Some(Reply {
                    command: answer.command,
                    in_reply_to: answer.in_reply_to.as_deref(),
                    charged: answer.charged,
                }),
            )
            .await?;
        let metrics = SagaMetrics::get();
        match applied {
            Applied::Moved(state) => {
                metrics.moved.with_label_values(&[state.as_str()]).inc();
                tracing::debug!(order = %answer.order, %state, event = ?answer.event, "saga moved")
            }
            Applied::Ignored(state) => {
                metrics.ignored.inc();
                tracing::info!(order = %answer.order, %state, event = ?answer.event, "a late or repeated answer; nothing changes")
            }
            Applied::NoSaga => {
                tracing::warn!(order = %answer.order, event = ?answer.event, "an answer for an order without a saga; ignored")
            }
        }
        Ok(())
    }
}

/// How many overdue sagas one run of the deadline scan passes.
const DEADLINES_PER_RUN: i64 = 200;

/// The leader's scan for sagas whose step is overdue, every `every`: each
/// gets [`Event::DeadlinePassed`] (compensation, or a resend).
pub fn deadline_job(store: Store, every: Duration) -> Job {
    Job {
        name: "saga-deadlines",
        scope: Scope::Leader,
        every,
        parallelism: 1,
        wake: None,
        run: Arc::new(move |_| {
            let store = store.clone();
            Box::pin(async move {
                let metrics = SagaMetrics::get();
                let passed = store
                    .pass_saga_deadlines(DEADLINES_PER_RUN)
                    .await
                    .map_err(JobError::from)?;
                if passed > 0 {
                    metrics.deadlines.inc_by(passed as u64);
                    tracing::info!(passed, "saga deadlines passed");
                }
                let (running, oldest) = store.running_sagas().await.map_err(JobError::from)?;
                metrics.running.set(running);
                metrics.oldest.set(oldest);
                Ok(if passed as i64 == DEADLINES_PER_RUN {
                    Progress::MoreWork
                } else {
                    Progress::Idle
                })
            })
        }),
    }
}

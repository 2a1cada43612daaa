//! The saga's orchestrator: the consumer of inventory's and payments'
//! answers, and the leader's deadline scan. The transitions themselves are
//! the pure [`saga::transition`]; their SQL is `store::saga`.

use std::sync::Arc;
use std::time::Duration;

use domain::OrderId;
use inbox::{Handler, Incoming, Poison};
use saga::{Event, SagaMessage, Topic};
use sqlx::PgConnection;
use store::saga::Applied;
use store::Store;
use worker::{Job, JobError, Progress, Scope};

/// The consumer name in the inbox, and the local destination of answers.
pub const CONSUMER: &str = "saga";

/// The topics it reads.
pub const TOPICS: [Topic; 2] = [Topic::Reserve, Topic::Payment];

/// An answer with the id of the message that carried it, which the chain
/// records as the step's idempotency key.
#[derive(Debug, Clone)]
pub struct Answer {
    id: String,
    order: OrderId,
    event: Event,
}

/// Applies inventory's and payments' answers to their sagas.
pub struct Orchestrator {
    store: Store,
}

impl Orchestrator {
    /// Over the orders database of `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Handler for Orchestrator {
    type Message = Answer;

    fn decode(&self, incoming: &Incoming) -> Result<Answer, Poison> {
        let message: SagaMessage = inbox::saga::decode(&TOPICS, incoming)?;
        let event = Event::of(&message)
            .ok_or_else(|| Poison::new("unknown_type", format!("{} is no answer", message.kind)))?;
        let order = OrderId::parse(&message.order_id).map_err(|e| Poison::new("invalid", e))?;
        Ok(Answer {
            id: incoming.id.clone().unwrap_or_default(),
            order,
            event,
        })
    }

    async fn apply(&self, conn: &mut PgConnection, answer: &Answer) -> sqlx::Result<()> {
        let applied = self
            .store
            .apply_saga_event(conn, &answer.order, &answer.event, &answer.id)
            .await?;
        match applied {
            Applied::Moved(state) => {
                tracing::debug!(order = %answer.order, %state, event = ?answer.event, "saga moved")
            }
            Applied::Ignored(state) => {
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
                let passed = store
                    .pass_saga_deadlines(DEADLINES_PER_RUN)
                    .await
                    .map_err(JobError::from)?;
                if passed > 0 {
                    tracing::info!(passed, "saga deadlines passed");
                }
                Ok(if passed as i64 == DEADLINES_PER_RUN {
                    Progress::MoreWork
                } else {
                    Progress::Idle
                })
            })
        }),
    }
}

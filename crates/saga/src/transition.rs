//! The saga's state machine. [`transition`] is pure: the store loads the
//! saga row, calls it, and writes what it answers (new state, commands to
//! the outbox, chain steps, deadline) in the same transaction as the inbox
//! record of the event, so a replayed event finds its inbox row and never
//! gets here twice; and an event the current state does not expect (a late
//! or duplicate answer) is [`None`]: nothing changes.
//!
//! ```text
//! Pending ──StockReserved──► Reserved ──PaymentSucceeded──► Completed (OrderCompleted sells the stock)
//!    │  └───────────────PaymentSucceeded (it overtook StockReserved)───────┘
//!    │ StockFailed              │ PaymentFailed / deadline
//!    ▼                          ▼
//! Cancelled ◄──all confirmed── Compensating {release, refund}
//!                               └─deadline: send what is unconfirmed again
//! ```
//!
//! The happy path is four messages: `ReserveStock` (carrying the charge),
//! `StockReserved` (read by payments, which charges, and by the saga),
//! `PaymentSucceeded`, and `OrderCompleted` (read by the notifier and by
//! inventory, which sells the reservation). Orchestration keeps the
//! decisions: only the saga completes or compensates, and inventory sells
//! stock only on its word.
//!
//! Compensation never gives up: a release or refund that is not confirmed
//! by its deadline is sent again. Inventory and payments make both
//! idempotent by order, and refuse a reservation or charge that arrives
//! after its release or refund (RabbitMQ does not order queues against each
//! other), so nothing is left held or charged by a cancelled order.

use std::fmt;
use std::str::FromStr;

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// `ReserveStock` sent; waiting for inventory (and payments).
    Pending,
    /// Stock held, payments charging; waiting for payments.
    Reserved,
    /// Charged, `CommitStock` sent; waiting for inventory. Only sagas
    /// started before `OrderCompleted` sold the stock are ever here.
    Paid,
    /// Sold. Final.
    Completed,
    /// Undoing: waiting for inventory's release and/or payments' refund.
    Compensating {
        /// `ReleaseStock` sent, not confirmed yet.
        release: bool,
        /// `RefundPayment` sent, not confirmed yet.
        refund: bool,
    },
    /// Nothing held, nothing charged. Final.
    Cancelled,
}

impl State {
    /// The order status that shows it, and the `sagas.state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Reserved => "reserved",
            State::Paid => "paid",
            State::Completed => "completed",
            State::Compensating { .. } => "compensating",
            State::Cancelled => "cancelled",
        }
    }

    /// Whether the saga is over.
    pub fn is_final(self) -> bool {
        matches!(self, State::Completed | State::Cancelled)
    }

    /// The state stored as `state`, `awaiting_release`, `awaiting_refund`.
    pub fn parse(state: &str, release: bool, refund: bool) -> Option<Self> {
        Some(match state {
            "pending" => State::Pending,
            "reserved" => State::Reserved,
            "paid" => State::Paid,
            "completed" => State::Completed,
            "compensating" => State::Compensating { release, refund },
            "cancelled" => State::Cancelled,
            _ => return None,
        })
    }

    /// What compensation still waits for: `(release, refund)`.
    pub fn awaiting(self) -> (bool, bool) {
        match self {
            State::Compensating { release, refund } => (release, refund),
            _ => (false, false),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a saga: an answer of inventory or payments, or its
/// deadline passing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every line is reserved.
    StockReserved,
    /// Nothing was reserved.
    StockFailed {
        /// Why, e.g. `not enough stock of sku-1`.
        reason: String,
    },
    /// The reservation is sold.
    StockCommitted,
    /// The reservation, if any, is released.
    StockReleased,
    /// The order's price was charged.
    PaymentSucceeded,
    /// Nothing was charged.
    PaymentFailed {
        /// Why, e.g. `insufficient funds`.
        reason: String,
    },
    /// The charge, if any, is refunded.
    PaymentRefunded,
    /// The step's deadline passed without its answer.
    DeadlinePassed,
}

impl Event {
    /// The event an answer of inventory or payments carries; [`None`] for a
    /// command or an outcome, which the saga never receives.
    pub fn of(message: &crate::SagaMessage) -> Option<Event> {
        use crate::Kind as K;
        let reason = || message.reason.clone().unwrap_or_default();
        Some(match message.kind {
            K::StockReserved => Event::StockReserved,
            K::StockFailed => Event::StockFailed { reason: reason() },
            K::StockCommitted => Event::StockCommitted,
            K::StockReleased => Event::StockReleased,
            K::PaymentSucceeded => Event::PaymentSucceeded,
            K::PaymentFailed => Event::PaymentFailed { reason: reason() },
            K::PaymentRefunded => Event::PaymentRefunded,
            K::ReserveStock
            | K::ReleaseStock
            | K::CommitStock
            | K::ChargePayment
            | K::RefundPayment
            | K::OrderCompleted
            | K::OrderCancelled => return None,
        })
    }
}

/// What the saga asks of the other services. The store fills in the data
/// (lines, account, amount, reason) from the saga row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `ReserveStock` to inventory.
    Reserve,
    /// `ReleaseStock` to inventory.
    Release,
    /// `CommitStock` to inventory (sagas that were `paid` before an
    /// upgrade).
    Commit,
    /// `RefundPayment` to payments.
    Refund,
    /// `OrderCompleted` to the notifier.
    NotifyCompleted,
    /// `OrderCancelled` to the notifier.
    NotifyCancelled,
}

impl Command {
    /// The message it is sent as.
    pub fn kind(self) -> crate::Kind {
        use crate::Kind as K;
        match self {
            Command::Reserve => K::ReserveStock,
            Command::Release => K::ReleaseStock,
            Command::Commit => K::CommitStock,
            Command::Refund => K::RefundPayment,
            Command::NotifyCompleted => K::OrderCompleted,
            Command::NotifyCancelled => K::OrderCancelled,
        }
    }
}

/// A step of the order's state chain (seed 001), in the order recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// The order and its saga were created; `ReserveStock` sent.
    OrderCreated,
    /// Stock reserved.
    ReserveCreated,
    /// Stock not reserved.
    ReserveFailed,
    /// Payments was asked to charge (by `StockReserved`).
    PaymentCreated,
    /// Charged.
    PaymentCompleted,
    /// Not charged.
    PaymentFailed,
    /// A step did not answer before its deadline; compensation started.
    DeadlinePassed,
    /// The reservation was sold (`OrderCompleted` tells inventory).
    ReserveCommitted,
    /// Compensation: the reservation was released.
    ReserveReleased,
    /// Compensation: the charge was refunded.
    PaymentRefunded,
    /// The saga completed.
    OrderCompleted,
    /// The saga was cancelled.
    OrderCancelled,
}

impl Step {
    /// Every step.
    pub const ALL: [Step; 12] = [
        Step::OrderCreated,
        Step::ReserveCreated,
        Step::ReserveFailed,
        Step::PaymentCreated,
        Step::PaymentCompleted,
        Step::PaymentFailed,
        Step::DeadlinePassed,
        Step::ReserveCommitted,
        Step::ReserveReleased,
        Step::PaymentRefunded,
        Step::OrderCompleted,
        Step::OrderCancelled,
    ];

    /// Its name in the chain, as seed 001 spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::OrderCreated => "ORDER_CREATED",
            Step::ReserveCreated => "RESERVE_CREATED",
            Step::ReserveFailed => "RESERVE_FAILED",
            Step::PaymentCreated => "PAYMENT_CREATED",
            Step::PaymentCompleted => "PAYMENT_COMPLETED",
            Step::PaymentFailed => "PAYMENT_FAILED",
            Step::DeadlinePassed => "DEADLINE_PASSED",
            Step::ReserveCommitted => "RESERVE_COMMITTED",
            Step::ReserveReleased => "RESERVE_RELEASED",
            Step::PaymentRefunded => "PAYMENT_REFUNDED",
            Step::OrderCompleted => "ORDER_COMPLETED",
            Step::OrderCancelled => "ORDER_CANCELLED",
        }
    }
}

impl FromStr for Step {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Step::ALL
            .into_iter()
            .find(|step| step.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a saga step"))
    }
}

/// What to do with the saga's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// A new step started: its answer is due one step timeout from now.
    Start,
    /// The saga is over: nothing is due.
    Clear,
}

/// The outcome of an event the saga expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The new state; the order gets a new version when it differs.
    pub state: State,
    /// To send, in this order.
    pub commands: Vec<Command>,
    /// To append to the chain, in this order.
    pub steps: Vec<Step>,
    /// The new deadline.
    pub deadline: Deadline,
    /// Why the saga is being cancelled, when this event is the cause.
    pub reason: Option<String>,
}

/// A saga's first transition: the order was created with a checkout.
pub fn start() -> Transition {
    Transition {
        state: State::Pending,
        commands: vec![Command::Reserve],
        steps: vec![Step::OrderCreated],
        deadline: Deadline::Start,
        reason: None,
    }
}

/// The state machine: what `event` does to a saga in `state`, or [`None`]
/// when the state does not expect it (a late or duplicate answer, or any
/// event after the end), which changes nothing.
pub fn transition(state: State, event: &Event) -> Option<Transition> {
    use Command as C;
    use Event as E;
    use State as S;
    let go = |state, commands: &[Command], steps: &[Step], deadline| Transition {
        state,
        commands: commands.to_vec(),
        steps: steps.to_vec(),
        deadline,
        reason: None,
    };
    let compensate = |release: bool, refund: bool, step, reason: String| {
        let commands: Vec<Command> = [(refund, C::Refund), (release, C::Release)]
            .into_iter()
            .filter_map(|(due, c)| due.then_some(c))
            .collect();
        Transition {
            reason: Some(reason),
            ..go(
                S::Compensating { release, refund },
                &commands,
                &[step],
                Deadline::Start,
            )
        }
    };
    let complete = |steps: &[Step]| {
        let mut all = steps.to_vec();
        all.extend([
            Step::PaymentCompleted,
            Step::ReserveCommitted,
            Step::OrderCompleted,
        ]);
        go(S::Completed, &[C::NotifyCompleted], &all, Deadline::Clear)
    };
    let reserved = [Step::ReserveCreated, Step::PaymentCreated];
    Some(match (state, event) {
        // Payments charges on the same message.
        (S::Pending, E::StockReserved) => go(S::Reserved, &[], &reserved, Deadline::Start),
        // The money is taken, so the sale stands: the OrderCompleted that
        // tells the notifier also tells inventory to sell the reservation,
        // which StockReserved (and so any PaymentSucceeded) proves is held.
        (S::Reserved, E::PaymentSucceeded) => complete(&[]),
        // Payments charges only on a StockReserved, so one that overtook
        // it (another topic, another queue) proves the reservation.
        (S::Pending, E::PaymentSucceeded) => complete(&reserved),
        (S::Pending, E::PaymentFailed { reason }) => {
            let mut t = compensate(true, false, Step::PaymentFailed, reason.clone());
            t.steps.splice(0..0, reserved);
            t
        }
        // A reservation is all or nothing: a failed one holds nothing.
        (S::Pending, E::StockFailed { reason }) => Transition {
            reason: Some(reason.clone()),
            ..go(
                S::Cancelled,
                &[C::NotifyCancelled],
                &[Step::ReserveFailed, Step::OrderCancelled],
                Deadline::Clear,
            )
        },
        // The reservation may still happen, and payments charge on it:
        // release and refund whatever they take.
        (S::Pending, E::DeadlinePassed) => compensate(
            true,
            true,
            Step::DeadlinePassed,
            "inventory did not answer in time".into(),
        ),
        (S::Reserved, E::PaymentFailed { reason }) => {
            compensate(true, false, Step::PaymentFailed, reason.clone())
        }
        // The charge may still happen: refund whatever it takes.
        (S::Reserved, E::DeadlinePassed) => compensate(
            true,
            true,
            Step::DeadlinePassed,
            "payments did not answer in time".into(),
        ),
        (S::Paid, E::StockCommitted) => go(
            S::Completed,
            &[C::NotifyCompleted],
            &[Step::ReserveCommitted, Step::OrderCompleted],
            Deadline::Clear,
        ),
        // The money is taken; the sale cannot fail, only be slow: ask again.
        (S::Paid, E::DeadlinePassed) => go(S::Paid, &[C::Commit], &[], Deadline::Start),
        (
            S::Compensating {
                release: true,
                refund,
            },
            E::StockReleased,
        ) => confirmed(false, refund, Step::ReserveReleased),
        (
            S::Compensating {
                release,
                refund: true,
            },
            E::PaymentRefunded,
        ) => confirmed(release, false, Step::PaymentRefunded),
        // Nothing left to confirm (only a hand-edited row gets here): done.
        (
            S::Compensating {
                release: false,
                refund: false,
            },
            E::DeadlinePassed,
        ) => confirmed(false, false, Step::OrderCancelled).without_first_step(),
        (S::Compensating { release, refund }, E::DeadlinePassed) => {
            let mut t = compensate(release, refund, Step::DeadlinePassed, String::new());
            t.steps.clear();
            t.reason = None;
            t
        }
        _ => return None,
    })
}

impl Transition {
    fn without_first_step(mut self) -> Self {
        self.steps.remove(0);
        self
    }
}

/// A compensation was confirmed; the saga is cancelled once both are.
fn confirmed(release: bool, refund: bool, step: Step) -> Transition {
    if release || refund {
        Transition {
            state: State::Compensating { release, refund },
            commands: Vec::new(),
            steps: vec![step],
            deadline: Deadline::Start,
            reason: None,
        }
    } else {
        Transition {
            state: State::Cancelled,
            commands: vec![Command::NotifyCancelled],
            steps: vec![step, Step::OrderCancelled],
            deadline: Deadline::Clear,
            reason: None,
        }
    }
}

/// Checks that `chain` is one the machine can record: replayed from
/// [`start`], each step is the next one a transition writes. Answers the
/// state it ends in.
pub fn replay(chain: &[Step]) -> Result<State, String> {
    let first = start();
    let mut expected: std::collections::VecDeque<Step> = first.steps.into();
    let mut state = first.state;
    let mut at = 0;
    while at < chain.len() {
        if let Some(step) = expected.pop_front() {
            if chain[at] != step {
                return Err(format!("step {at} is {:?}, {step:?} was due", chain[at]));
            }
            at += 1;
            continue;
        }
        let event = match chain[at] {
            Step::ReserveCreated => Event::StockReserved,
            Step::ReserveFailed => Event::StockFailed {
                reason: String::new(),
            },
            Step::PaymentCompleted => Event::PaymentSucceeded,
            Step::PaymentFailed => Event::PaymentFailed {
                reason: String::new(),
            },
            Step::DeadlinePassed => Event::DeadlinePassed,
            Step::ReserveCommitted => Event::StockCommitted,
            Step::ReserveReleased => Event::StockReleased,
            Step::PaymentRefunded => Event::PaymentRefunded,
            other => return Err(format!("step {at}, {other:?}, follows no answer")),
        };
        let t = transition(state, &event)
            .ok_or_else(|| format!("step {at}, {:?}, is not possible in {state}", chain[at]))?;
        state = t.state;
        expected = t.steps.into();
    }
    match expected.front() {
        Some(step) => Err(format!("the chain ends before {step:?}")),
        None => Ok(state),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Command as C;
    use Event as E;
    use State as S;

    const COMPENSATING: [State; 4] = [
        S::Compensating {
            release: true,
            refund: true,
        },
        S::Compensating {
            release: true,
            refund: false,
        },
        S::Compensating {
            release: false,
            refund: true,
        },
        S::Compensating {
            release: false,
            refund: false,
        },
    ];

    fn states() -> Vec<State> {
        let mut all = vec![S::Pending, S::Reserved, S::Paid, S::Completed, S::Cancelled];
        all.extend(COMPENSATING);
        all
    }

    fn events() -> Vec<Event> {
        vec![
            E::StockReserved,
            E::StockFailed {
                reason: "not enough stock of sku-1".into(),
            },
            E::StockCommitted,
            E::StockReleased,
            E::PaymentSucceeded,
            E::PaymentFailed {
                reason: "insufficient funds".into(),
            },
            E::PaymentRefunded,
            E::DeadlinePassed,
        ]
    }

    fn comp(release: bool, refund: bool) -> State {
        S::Compensating { release, refund }
    }

    type Row = (
        State,
        Event,
        State,
        &'static [Command],
        &'static [Step],
        Deadline,
    );

    /// Every pair the saga accepts, with its documented result. Every pair
    /// not listed must change nothing.
    #[rustfmt::skip]
    fn table() -> Vec<Row> {
        use Deadline::{Clear, Start};
        use Step as T;
        let failed_stock = E::StockFailed {
            reason: "not enough stock of sku-1".into(),
        };
        let failed_payment = E::PaymentFailed {
            reason: "insufficient funds".into(),
        };
        vec![
            (S::Pending, E::StockReserved, S::Reserved, &[], &[T::ReserveCreated, T::PaymentCreated], Start),
            (S::Pending, failed_stock, S::Cancelled, &[C::NotifyCancelled], &[T::ReserveFailed, T::OrderCancelled], Clear),
            (S::Pending, E::DeadlinePassed, comp(true, true), &[C::Refund, C::Release], &[T::DeadlinePassed], Start),
            (S::Pending, E::PaymentSucceeded, S::Completed, &[C::NotifyCompleted], &[T::ReserveCreated, T::PaymentCreated, T::PaymentCompleted, T::ReserveCommitted, T::OrderCompleted], Clear),
            (S::Pending, failed_payment.clone(), comp(true, false), &[C::Release], &[T::ReserveCreated, T::PaymentCreated, T::PaymentFailed], Start),
            (S::Reserved, E::PaymentSucceeded, S::Completed, &[C::NotifyCompleted], &[T::PaymentCompleted, T::ReserveCommitted, T::OrderCompleted], Clear),
            (S::Reserved, failed_payment, comp(true, false), &[C::Release], &[T::PaymentFailed], Start),
            (S::Reserved, E::DeadlinePassed, comp(true, true), &[C::Refund, C::Release], &[T::DeadlinePassed], Start),
            (S::Paid, E::StockCommitted, S::Completed, &[C::NotifyCompleted], &[T::ReserveCommitted, T::OrderCompleted], Clear),
            (S::Paid, E::DeadlinePassed, S::Paid, &[C::Commit], &[], Start),
            (comp(true, true), E::StockReleased, comp(false, true), &[], &[T::ReserveReleased], Start),
            (comp(true, true), E::PaymentRefunded, comp(true, false), &[], &[T::PaymentRefunded], Start),
            (comp(true, true), E::DeadlinePassed, comp(true, true), &[C::Refund, C::Release], &[], Start),
            (comp(true, false), E::StockReleased, S::Cancelled, &[C::NotifyCancelled], &[T::ReserveReleased, T::OrderCancelled], Clear),
            (comp(true, false), E::DeadlinePassed, comp(true, false), &[C::Release], &[], Start),
            (comp(false, true), E::PaymentRefunded, S::Cancelled, &[C::NotifyCancelled], &[T::PaymentRefunded, T::OrderCancelled], Clear),
            (comp(false, true), E::DeadlinePassed, comp(false, true), &[C::Refund], &[], Start),
            (comp(false, false), E::DeadlinePassed, S::Cancelled, &[C::NotifyCancelled], &[T::OrderCancelled], Clear),
        ]
    }

    #[test]
    fn every_state_and_event_gives_the_documented_result() {
        let table = table();
        let mut checked = 0;
        for state in states() {
            for event in events() {
                let got = transition(state, &event);
                match table.iter().find(|(s, e, ..)| *s == state && *e == event) {
                    Some((_, _, to, commands, steps, deadline)) => {
                        let got = got.unwrap_or_else(|| panic!("{state} + {event:?} ignored"));
                        assert_eq!(got.state, *to, "{state} + {event:?}");
                        assert_eq!(got.commands, *commands, "{state} + {event:?}");
                        assert_eq!(got.steps, *steps, "{state} + {event:?}");
                        assert_eq!(got.deadline, *deadline, "{state} + {event:?}");
                    }
                    None => assert_eq!(got, None, "{state} + {event:?} must change nothing"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 9 * 8);
    }

    #[test]
    fn a_replayed_answer_changes_nothing() {
        for (state, event, to, ..) in table() {
            if event == E::DeadlinePassed {
                continue; // a deadline is not an answer: it fires again by design
            }
            assert_eq!(transition(to, &event), None, "{state} + {event:?} twice");
        }
    }

    #[test]
    fn final_states_ignore_everything() {
        for state in [S::Completed, S::Cancelled] {
            assert!(state.is_final());
            for event in events() {
                assert_eq!(transition(state, &event), None);
            }
        }
    }

    #[test]
    fn a_cancellation_carries_its_cause() {
        let by_stock = transition(
            S::Pending,
            &E::StockFailed {
                reason: "not enough stock of sku-1".into(),
            },
        )
        .unwrap();
        assert_eq!(
            by_stock.reason.as_deref(),
            Some("not enough stock of sku-1")
        );
        let by_funds = transition(
            S::Reserved,
            &E::PaymentFailed {
                reason: "insufficient funds".into(),
            },
        )
        .unwrap();
        assert_eq!(by_funds.reason.as_deref(), Some("insufficient funds"));
        let by_time = transition(S::Reserved, &E::DeadlinePassed).unwrap();
        assert_eq!(
            by_time.reason.as_deref(),
            Some("payments did not answer in time")
        );
        // Confirmations and resends keep the cause already recorded.
        for (state, event) in [
            (comp(true, false), E::StockReleased),
            (comp(true, true), E::DeadlinePassed),
        ] {
            assert_eq!(transition(state, &event).unwrap().reason, None);
        }
    }

    /// Walks every path from `start()` and checks the chain each leaves:
    /// it begins with ORDER_CREATED, ends in exactly one of
    /// ORDER_COMPLETED / ORDER_CANCELLED, and the last command on
    /// the way to the end notifies that outcome, once.
    #[test]
    fn every_path_ends_in_one_outcome_with_one_notification() {
        fn walk(
            state: State,
            steps: Vec<Step>,
            commands: Vec<Command>,
            depth: usize,
            ends: &mut usize,
        ) {
            if state.is_final() {
                *ends += 1;
                let outcomes: Vec<&Step> = steps
                    .iter()
                    .filter(|s| matches!(s, Step::OrderCompleted | Step::OrderCancelled))
                    .collect();
                assert_eq!(outcomes.len(), 1, "{steps:?}");
                assert_eq!(steps.last(), outcomes.last().copied());
                let notices = commands
                    .iter()
                    .filter(|c| matches!(c, C::NotifyCompleted | C::NotifyCancelled))
                    .count();
                assert_eq!(notices, 1, "{steps:?}");
                // Stock and money: whatever was asked is given back or kept.
                let count = |c| commands.iter().filter(|x| **x == c).count();
                if state == S::Cancelled {
                    assert!(count(C::Commit) == 0, "{steps:?}");
                    assert_eq!(count(C::NotifyCompleted), 0, "{steps:?}");
                    // Payments charges on any StockReserved: unless stock
                    // failed (then nothing was held or charged), what may
                    // be held is released, and what may be charged is
                    // refunded unless the charge failed.
                    if !steps.contains(&Step::ReserveFailed) {
                        assert!(count(C::Release) > 0, "{steps:?}");
                        if !steps.contains(&Step::PaymentFailed) {
                            assert!(count(C::Refund) > 0, "{steps:?}");
                        }
                    }
                }
                return;
            }
            if depth == 0 {
                return;
            }
            for event in events() {
                if let Some(t) = transition(state, &event) {
                    let mut s = steps.clone();
                    s.extend(&t.steps);
                    let mut c = commands.clone();
                    c.extend(&t.commands);
                    walk(t.state, s, c, depth - 1, ends);
                }
            }
        }
        let first = start();
        assert_eq!(first.steps, [Step::OrderCreated]);
        let mut ends = 0;
        walk(first.state, first.steps, first.commands, 6, &mut ends);
        assert!(ends > 10, "only {ends} paths end");
    }

    #[test]
    fn only_chains_the_machine_writes_replay() {
        use Step as T;
        let completed = [
            T::OrderCreated,
            T::ReserveCreated,
            T::PaymentCreated,
            T::PaymentCompleted,
            T::ReserveCommitted,
            T::OrderCompleted,
        ];
        assert_eq!(replay(&completed), Ok(S::Completed));
        let timed_out = [
            T::OrderCreated,
            T::ReserveCreated,
            T::PaymentCreated,
            T::DeadlinePassed,
            T::PaymentRefunded,
            T::ReserveReleased,
            T::OrderCancelled,
        ];
        assert_eq!(replay(&timed_out), Ok(S::Cancelled));
        assert_eq!(
            replay(&completed[..3]),
            Ok(S::Reserved),
            "a saga still running"
        );
        assert!(replay(&completed[..4]).is_err(), "the sale is one step");
        for bad in [
            &[T::OrderCreated, T::PaymentCreated][..],
            &[T::OrderCreated, T::ReserveCreated][..],
            &[T::OrderCreated, T::ReserveFailed, T::ReserveReleased][..],
            &[
                T::OrderCreated,
                T::ReserveCreated,
                T::PaymentCreated,
                T::PaymentCompleted,
                T::ReserveCommitted,
                T::OrderCompleted,
                T::OrderCompleted,
            ][..],
            &[T::ReserveCreated][..],
        ] {
            assert!(replay(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn states_and_steps_are_stored_by_name() {
        for state in states() {
            let (release, refund) = state.awaiting();
            assert_eq!(State::parse(state.as_str(), release, refund), Some(state));
        }
        for step in Step::ALL {
            assert_eq!(step.as_str().parse::<Step>(), Ok(step));
        }
    }
}

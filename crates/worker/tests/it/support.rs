//! Helpers of the election tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// One election candidate of an election test.
pub struct Candidate {
    pub elector: Arc<worker::Elector>,
    pub task: tokio::task::JoinHandle<()>,
    pub shutdown: CancellationToken,
}

/// The indices of the candidates that believe they lead.
pub fn leaders(cs: &[Candidate]) -> Vec<usize> {
    use worker::Leader;
    (0..cs.len())
        .filter(|&i| cs[i].elector.is_leader())
        .collect()
}

/// Waits until exactly one candidate leads; returns it and how long it took.
pub async fn wait_for_one_leader(cs: &[Candidate], within: Duration) -> (usize, Duration) {
    let started = Instant::now();
    loop {
        if let [one] = leaders(cs)[..] {
            return (one, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "no single leader within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

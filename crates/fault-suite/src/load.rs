//! Saves through the API as a well-behaved client would: it retries 503 and
//! lost connections, and it records every answer, so a scenario can assert
//! that the API failed only in the ways it promises.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::system::API_TOKEN;

/// Every answer the API gave, by kind.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Saves that succeeded (201 or 200).
    pub saved: u64,
    /// 503 problem+json answers, each retried.
    pub unavailable: u64,
    /// Connection errors (refused, reset), each retried.
    pub connection_errors: u64,
    /// Anything else: a broken promise. Reported, and the scenario fails.
    pub unexpected: Vec<String>,
    /// The slowest single answer.
    pub slowest: Duration,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    api: String,
    tally: Arc<Mutex<Tally>>,
}

/// The longest a save keeps retrying before the scenario fails.
const GIVE_UP: Duration = Duration::from_secs(60);

impl Client {
    pub fn new(http: reqwest::Client, api: &str) -> Self {
        Self {
            http,
            api: api.to_owned(),
            tally: Arc::default(),
        }
    }

    pub fn tally(&self) -> Tally {
        self.tally.lock().expect("not poisoned").clone()
    }

    fn record(&self, f: impl FnOnce(&mut Tally)) {
        f(&mut self.tally.lock().expect("not poisoned"));
    }

    /// Saves `body` as order `id`; returns the version saved.
    pub async fn save(&self, id: &str, body: &Value) -> Result<i64> {
        let started = Instant::now();
        loop {
            let sent = Instant::now();
            let res = self
                .http
                .put(format!("{}/api/v1/orders/{id}", self.api))
                .bearer_auth(API_TOKEN)
                .json(body)
                .send()
                .await;
            let took = sent.elapsed();
            self.record(|t| t.slowest = t.slowest.max(took));
            match res {
                Ok(res) if res.status().is_success() => {
                    let view: Value = res.json().await?;
                    self.record(|t| t.saved += 1);
                    return view["version"]
                        .as_i64()
                        .ok_or_else(|| anyhow::anyhow!("no version"));
                }
                Ok(res) => {
                    let status = res.status();
                    let problem = res
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
                    let text = res.text().await.unwrap_or_default();
                    if status == 503 && problem {
                        self.record(|t| t.unavailable += 1);
                    } else {
                        self.record(|t| t.unexpected.push(format!("{status} {text}")));
                    }
                }
                Err(e) if e.is_connect() || e.is_request() => {
                    self.record(|t| t.connection_errors += 1);
                }
                Err(e) => self.record(|t| t.unexpected.push(e.to_string())),
            }
            if started.elapsed() > GIVE_UP {
                bail!("saving {id} kept failing for {GIVE_UP:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What a run of saves left behind.
#[derive(Debug, Default)]
pub struct Saved {
    /// The newest version the API confirmed, per order.
    pub versions: HashMap<String, i64>,
    pub saves: u64,
}

/// `creates` new orders `prefix-N`, and after every third one an update of
/// a random order created earlier, from `concurrency` workers.
pub async fn saves(
    client: &Client,
    prefix: &str,
    creates: usize,
    concurrency: usize,
) -> Result<Saved> {
    // (id, status, price): updates change the price, so each is a real new
    // version.
    let mut ops = Vec::with_capacity(creates * 4 / 3);
    for n in 0..creates {
        ops.push((format!("{prefix}-{n}"), "new", 100.0));
        if n % 3 == 2 {
            let earlier = rand::random_range(0..n);
            ops.push((format!("{prefix}-{earlier}"), "new", 200.0 + n as f64));
        }
    }
    run(client, ops, concurrency).await
}

/// `creates` new orders `prefix-N`, then an update of each of the first
/// `updates`, every other one a status change too.
pub async fn creates_then_updates(
    client: &Client,
    prefix: &str,
    creates: usize,
    updates: usize,
    concurrency: usize,
) -> Result<Saved> {
    let mut saved = run(
        client,
        (0..creates)
            .map(|n| (format!("{prefix}-{n}"), "new", 100.0))
            .collect(),
        concurrency,
    )
    .await?;
    let changed = run(
        client,
        (0..updates.min(creates))
            .map(|n| {
                let status = if n % 2 == 0 { "confirmed" } else { "new" };
                (format!("{prefix}-{n}"), status, 150.0)
            })
            .collect(),
        concurrency,
    )
    .await?;
    saved.saves += changed.saves;
    saved.versions.extend(changed.versions);
    Ok(saved)
}

async fn run(
    client: &Client,
    ops: Vec<(String, &'static str, f64)>,
    concurrency: usize,
) -> Result<Saved> {
    let ops = Arc::new(ops);
    let next = Arc::new(AtomicUsize::new(0));
    let workers = (0..concurrency).map(|_| {
        let (client, ops, next) = (client.clone(), ops.clone(), next.clone());
        tokio::spawn(async move {
            let mut versions: Vec<(String, i64)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, status, price)) = ops.get(i) else {
                    return Ok::<_, anyhow::Error>(versions);
                };
                let body = testkit::sample_order_with(id, status, *price);
                versions.push((id.clone(), client.save(id, &body).await?));
            }
        })
    });
    let mut saved = Saved::default();
    for w in futures::future::join_all(workers).await {
        for (id, v) in w?? {
            saved.saves += 1;
            let e = saved.versions.entry(id).or_default();
            *e = (*e).max(v);
        }
    }
    Ok(saved)
}

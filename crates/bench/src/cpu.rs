//! Where the machine's CPU went during a measured window: each process's
//! user and system time from `/proc`, grouped by what the process is, and
//! the machine's busy time from `/proc/stat`. Figures are in CPU seconds,
//! so a window's share per unit of work (a saga) is comparable across runs
//! and against the machine's budget (cores / target rate).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};

/// Counters read at one instant, in clock ticks.
pub struct Sample {
    at: Instant,
    /// The CPUs `/proc/stat` counts.
    cores: usize,
    /// Ticks of every CPU, idle included, and of the busy ones.
    all: u64,
    busy: u64,
    /// Per process: its name and ticks so far.
    processes: HashMap<u32, (String, u64)>,
}

/// CPU seconds spent between two samples.
pub struct Spent {
    /// The machine's cores.
    pub cores: usize,
    /// Busy CPU seconds of the whole machine.
    pub machine: f64,
    /// Busy CPU seconds per group, largest first; what ended within the
    /// window is in the machine's figure only.
    pub groups: Vec<(String, f64)>,
}

impl Sample {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("an empty /proc/stat")?;
        // user nice system idle iowait irq softirq steal (guest time is
        // already in user).
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let all: u64 = ticks.iter().sum();
        let busy = all - ticks[3] - ticks[4];
        let cores = stat
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count()
            .max(1);
        let mut processes = HashMap::new();
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // Gone since the listing: nothing to count.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            if let Some(p) = process_ticks(&stat) {
                processes.insert(pid, p);
            }
        }
        Ok(Self {
            at: Instant::now(),
            cores,
            all,
            busy,
            processes,
        })
    }

    /// What was spent from `self` to `later`, each process grouped by
    /// `roles` (pid to name) or else by its command name. Every role must
    /// still run: one that ended took its CPU time with it.
    pub fn until(&self, later: &Sample, roles: &HashMap<u32, String>) -> Result<Spent> {
        if let Some((pid, name)) = roles
            .iter()
            .find(|(pid, _)| !later.processes.contains_key(pid))
        {
            anyhow::bail!(
                "{name} (pid {pid}) is not in /proc: it ended, or its stat line did not parse"
            );
        }
        let cores = later.cores;
        // Every CPU's ticks, idle included, cover cores × the window: the
        // tick rate without assuming one.
        let wall = (later.at - self.at).as_secs_f64().max(1e-3);
        let per_second = later.all.saturating_sub(self.all).max(1) as f64 / (cores as f64 * wall);
        let to_seconds = |ticks: u64| ticks as f64 / per_second;
        let mut groups: HashMap<String, u64> = HashMap::new();
        for (pid, (comm, ticks)) in &later.processes {
            let before = self.processes.get(pid).map_or(0, |(_, t)| *t);
            let name = roles.get(pid).cloned().unwrap_or_else(|| group_of(comm));
            *groups.entry(name).or_default() += ticks.saturating_sub(before);
        }
        let mut groups: Vec<(String, f64)> = groups
            .into_iter()
            .map(|(name, ticks)| (name, to_seconds(ticks)))
            .filter(|(_, s)| *s > 0.0)
            .collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(Spent {
            cores,
            machine: to_seconds(later.busy.saturating_sub(self.busy)),
            groups,
        })
    }
}

/// `(command name, user + system ticks)` from a `/proc/<pid>/stat` line.
fn process_ticks(stat: &str) -> Option<(String, u64)> {
    // The name is in parentheses and may hold spaces or parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields 14 and 15 of the line; the state, field 3, is first here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// The group of a process the bench did not start itself.
fn group_of(comm: &str) -> String {
    match comm {
        "postgres" => "PostgreSQL",
        "java" => "Kafka",
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "RabbitMQ",
        "bench" => "bench (clients)",
        _ => "other",
    }
    .to_owned()
}

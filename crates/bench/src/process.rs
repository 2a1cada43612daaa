//! The release binaries as child processes, and their peak memory.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A role process and the URL it announced.
pub struct Proc {
    pub child: Child,
    pub url: String,
}

/// A binary built next to `bench` (`cargo build --release --bins`).
fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --release --locked --bins` first",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `binary args`, waiting for the log line holding `ready`.
pub async fn spawn(binary: &str, args: &[&str], env: &[(&str, &str)], ready: &str) -> Result<Proc> {
    let mut command = Command::new(sibling(binary)?);
    command
        .args(args)
        .env("RUST_LOG", "info,sqlx=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {binary}"))?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .with_context(|| format!("{binary} did not log {ready:?}"))??
            .with_context(|| format!("{binary} exited before {ready:?}"))?;
        if line.contains(ready) {
            let start = line.find("http://").context("no URL in the ready line")?;
            break line[start..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc { child, url })
}

impl Proc {
    /// Peak resident memory (VmHWM) so far, in MiB.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        let pid = self.child.id().context("process exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmHWM")?;
        Ok(kib / 1024.0)
    }

    /// SIGTERM, then wait.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().context("process exited")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??;
        Ok(())
    }
}

//! The built role binaries (`orders-center`, `onec-mock`) as child
//! processes: started and awaited until ready, logged to a file, measured,
//! stopped or killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A role process and the URL it announced.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// The `http://` URL from its ready line.
    pub url: String,
    /// The ready line itself, for what else it names.
    pub ready_line: String,
}

/// A binary built next to the running one (`cargo build --release --bins`).
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

/// Starts `binary args` with `env` added, waiting for the log line holding
/// `ready`. Its log (stderr) is copied to `log`, appending.
pub async fn spawn(
    binary: &str,
    args: &[&str],
    env: &[(&str, &str)],
    ready: &str,
    log: &Path,
) -> Result<Proc> {
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
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
        .with_context(|| format!("opening {}", log.display()))?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (url, ready_line) = loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .with_context(|| format!("{binary} did not log {ready:?}"))??
            .with_context(|| format!("{binary} exited before {ready:?}"))?;
        file.write_all(format!("{line}\n").as_bytes()).await?;
        if line.contains(ready) {
            let start = line.find("http://").context("no URL in the ready line")?;
            let url = line[start..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            break (url, line);
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
        let _ = file.flush().await;
    });
    Ok(Proc {
        child,
        url,
        ready_line,
    })
}

impl Proc {
    /// The process id, while it runs.
    pub fn pid(&self) -> Result<u32> {
        self.child.id().context("process exited")
    }

    /// Peak resident memory (VmHWM) so far, in MiB.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmHWM")?;
        Ok(kib / 1024.0)
    }

    /// SIGTERM, then wait for a clean exit; returns how long it took.
    pub async fn stop(mut self) -> Result<Duration> {
        let started = Instant::now();
        let pid = self.pid()?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("did not stop within 60 s of SIGTERM")??;
        if !status.success() {
            bail!("exited with {status} after SIGTERM");
        }
        Ok(started.elapsed())
    }

    /// SIGKILL, then reap.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

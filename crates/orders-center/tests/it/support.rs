use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, Command};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

/// The built binary, with a clean environment for the variables it reads.
pub fn orders_center(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orders-center"));
    c.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("LISTEN_ADDR")
        .env_remove("MIGRATE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Reads lines until one contains `needle`, failing after `timeout`.
pub async fn line_containing<R: AsyncRead + Unpin>(
    lines: &mut Lines<BufReader<R>>,
    needle: &str,
    timeout: Duration,
) -> String {
    tokio::time::timeout(timeout, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("output ended before a line containing {needle:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no line containing {needle:?} within {timeout:?}"))
}

pub fn lines<R: AsyncRead + Unpin>(r: Option<R>) -> Lines<BufReader<R>> {
    BufReader::new(r.expect("piped")).lines()
}

/// Polls `url` until it answers 200 or `deadline` passes.
pub async fn wait_healthy(url: &str, deadline: Instant) {
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} not healthy in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `signal` to the child and waits for it to exit successfully.
pub async fn stop(child: &mut Child, signal: &str, timeout: Duration) {
    let pid = child.id().expect("still running").to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .unwrap_or_else(|_| panic!("no exit within {timeout:?} of SIG{signal}"))
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// The first URL in a log or banner line, up to whitespace or a quote.
pub fn url_in(line: &str) -> String {
    let start = line.find("http://").expect("a URL");
    line[start..]
        .split(|c: char| c.is_whitespace() || c == '"')
        .next()
        .unwrap()
        .to_owned()
}

/// A role process whose log is drained in the background (a full pipe would
/// block it) and kept for the failure message.
pub struct Role {
    pub child: Child,
    pub url: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Role {
    /// Spawns `command` and waits for the log line holding `ready`, whose
    /// URL becomes [`Role::url`].
    pub async fn spawn(command: &mut Command, ready: &str) -> Self {
        let mut child = command.spawn().expect("spawn role");
        let mut err = lines(child.stderr.take());
        let line = line_containing(&mut err, ready, Duration::from_secs(30)).await;
        let url = url_in(&line);
        let log = std::sync::Arc::new(std::sync::Mutex::new(vec![line]));
        let l = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err.next_line().await {
                let mut log = l.lock().unwrap();
                if log.len() < 2000 {
                    log.push(line);
                }
            }
        });
        Self { child, url, log }
    }

    /// The last lines of the role's log.
    pub fn tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log.iter()
            .rev()
            .take(20)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The `onec-mock` binary, built next to `orders-center` by `cargo test --workspace`.
pub fn onec_mock(args: &[&str]) -> Command {
    let path = Path::new(env!("CARGO_BIN_EXE_orders-center")).with_file_name("onec-mock");
    assert!(
        path.is_file(),
        "{} is missing: run the workspace's tests (cargo test --workspace) or cargo build -p onec-mock",
        path.display()
    );
    let mut c = Command::new(path);
    c.args(args)
        .env_remove("LISTEN_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// GETs `url` and parses its JSON body.
pub async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// The text of `url`.
pub async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The sum of every sample of metric `name` in a text exposition.
pub fn sample_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Lints a text exposition with `promtool check metrics`.
pub fn promtool_check_metrics(role: &str, exposition: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus; .ci/run does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed for {role}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The deployed shape as processes: `onec-mock`, one `api`, and `relays`
/// relays electing a leader through PostgreSQL, on database `db_url`.
pub struct System {
    pub mock: Role,
    pub api: Role,
    pub relays: Vec<Role>,
}

impl System {
    pub async fn start(db_url: &str, mock_faults: &[&str], relays: usize) -> Self {
        Self::start_with_env(db_url, mock_faults, relays, &[]).await
    }

    /// The same, with `env` added to the api and every relay.
    pub async fn start_with_env(
        db_url: &str,
        mock_faults: &[&str],
        relays: usize,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_relays_with(
            db_url,
            mock_faults,
            relays,
            env,
            &["--leader-election", "postgres"],
        )
        .await
    }

    /// The same, with `relay_args` (the leader election's among them) given
    /// to every relay.
    pub async fn start_relays_with(
        db_url: &str,
        mock_faults: &[&str],
        relays: usize,
        env: &[(&str, &str)],
        relay_args: &[&str],
    ) -> Self {
        let mock_args = [
            &[
                "--listen",
                "127.0.0.1:0",
                "--username",
                "relay",
                "--password",
                "pw",
            ][..],
            mock_faults,
        ]
        .concat();
        let mock = Role::spawn(&mut onec_mock(&mock_args), "onec-mock listening").await;
        let api = Role::spawn(
            orders_center(&["api", "--listen", "127.0.0.1:0", "--migrate"])
                .env("DATABASE_URL", db_url)
                .envs(env.iter().copied()),
            "api listening",
        )
        .await;
        let mut started = Vec::new();
        for i in 0..relays {
            let id = format!("relay-{i}");
            let mut relay = orders_center(&[
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--relay-id",
                &id,
                "--onec-url",
                &mock.url,
                "--onec-username",
                "relay",
                "--poll-interval",
                "250ms",
                "--backoff-base",
                "50ms",
                "--backoff-max",
                "1s",
                "--breaker-cool-down",
                "500ms",
                "--onec-timeout",
                "5s",
                "--lease-duration",
                "3s",
                "--lease-renew-deadline",
                "2s",
                "--lease-retry-period",
                "500ms",
                "--backlog-interval",
                "1s",
            ]);
            relay
                .args(relay_args)
                .env("DATABASE_URL", db_url)
                .env("ONEC_PASSWORD", "pw")
                .envs(env.iter().copied());
            started.push(Role::spawn(&mut relay, "relay started").await);
        }
        Self {
            mock,
            api,
            relays: started,
        }
    }

    /// SIGTERM to every process; each must exit cleanly.
    pub async fn stop(mut self) {
        for relay in &mut self.relays {
            stop(&mut relay.child, "TERM", Duration::from_secs(15)).await;
        }
        stop(&mut self.api.child, "TERM", Duration::from_secs(15)).await;
        stop(&mut self.mock.child, "TERM", Duration::from_secs(15)).await;
    }
}

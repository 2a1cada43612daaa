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

//! A server owned by a tiny `sh` watchdog whose stdin is a pipe from this
//! process. When the pipe closes, because the owner was dropped or because
//! this process died in any way, the watchdog kills the server, runs an
//! optional clean-up command and deletes the run directory. So neither a
//! panic nor SIGKILL of the test binary leaves a server behind.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cache::tail;
use crate::{Error, Result};

// The server runs in a session of its own, so killing its process group
// also kills what its start script forked (RabbitMQ's script runs beam as a
// child). The data is thrown away, so SIGKILL is the quickest correct stop.
const SCRIPT: &str = r#"
log=$1; remove=$2; after=$3; shift 3
setsid "$@" >>"$log" 2>&1 &
pid=$!
echo "$pid" >"$log.pid"
cat >/dev/null
kill -KILL "-$pid" 2>/dev/null
wait "$pid"
# The leader is reaped; the rest of its group may still be dying, holding
# its ports. Wait for them, 5 s at most (a zombie nobody reaps still counts).
n=0
while kill -0 "-$pid" 2>/dev/null && [ "$n" -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
[ -n "$after" ] && sh -c "$after" >/dev/null 2>&1
[ -n "$remove" ] && rm -rf "$remove"
exit 0
"#;

/// One supervised server process.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Watchdog {
    /// Starts `command` with its output appended to `log`. On stop, `after`
    /// runs in `sh` and `remove` is deleted.
    pub(crate) fn spawn(
        command: &Command,
        log: &Path,
        remove: Option<&Path>,
        after: Option<&str>,
    ) -> Result<Self> {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(SCRIPT)
            .arg("watchdog")
            .arg(log)
            .arg(remove.unwrap_or(Path::new("")))
            .arg(after.unwrap_or(""))
            .arg(command.get_program())
            .args(command.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Keep the terminal's Ctrl-C away: the owner decides when it stops.
            .process_group(0);
        for (key, value) in command.get_envs() {
            match value {
                Some(v) => sh.env(key, v),
                None => sh.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            sh.current_dir(dir);
        }
        let mut child = sh.spawn()?;
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            log: log.to_owned(),
        })
    }

    /// Polls `ready` every 50 ms until it holds, the server exits, or
    /// `timeout` passes; the error carries the end of the log.
    pub(crate) fn wait_until(
        &mut self,
        server: &'static str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                let why = if exited {
                    "exited"
                } else {
                    "not ready in time"
                };
                return Err(Error::Start {
                    server,
                    detail: format!("{why} after {timeout:?}; log:\n{}", self.log_tail(15)),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
            lines,
        )
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the server's process group.
    pub(crate) fn signal(&self, signal: &str) -> Result<()> {
        let pid_file = self.log.with_extension("log.pid");
        let pid = std::fs::read_to_string(&pid_file)?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{}", pid.trim()))
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Prepare {
                step: format!("kill -{signal} of the server's group"),
                detail: status.to_string(),
            })
        }
    }

    /// Kills the server and waits until the clean-up is done.
    pub(crate) fn stop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port free at the time of asking. Another process may take it
/// before the server binds; callers start over when the server then fails.
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh run directory under `target/tmp`, owned by the caller.
pub(crate) fn run_dir(prefix: &str) -> Result<PathBuf> {
    let parent = crate::tmp_dir();
    std::fs::create_dir_all(&parent)?;
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)?
        .keep())
}

/// Tries `start` up to three times: a port taken between the probe and the
/// bind makes one attempt fail.
pub(crate) fn with_retries<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match start() {
            Err(Error::Start { .. }) if attempt < 3 => continue,
            other => return other,
        }
    }
}

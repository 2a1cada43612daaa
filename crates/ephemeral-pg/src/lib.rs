//! A throwaway PostgreSQL cluster made from the locally installed server
//! binaries: `initdb` in a fresh directory, `postgres` on a free loopback port,
//! and everything removed again when it is dropped.
//!
//! The server is owned by a tiny `sh` watchdog whose stdin is a pipe from this
//! process. When the pipe closes, because [`EphemeralPostgres`] was dropped or
//! because this process died in any way, the watchdog stops the server and
//! deletes the directory. So neither Ctrl-C nor SIGKILL leaves a server behind.

use std::io::{self, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors while making or starting the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `initdb` and `postgres` are not installed where we looked.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found in $PG_BIN_DIR, $PATH or \
         /usr/lib/postgresql/*/bin; install them (Debian: `apt-get install postgresql`) \
         or set DATABASE_URL to an existing server"
    )]
    BinariesNotFound,
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error("running as root and user `postgres` does not exist; initdb refuses to run as root")]
    NoPostgresUser,
    /// `initdb` failed.
    #[error("initdb failed: {0}")]
    Initdb(String),
    /// The server did not become ready in time or exited.
    #[error("postgres did not start: {0}")]
    Start(String),
    /// File system or process error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// How to make the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory to create the cluster's temporary directory in.
    pub parent_dir: PathBuf,
    /// Keep `fsync` on; off by default because the data is thrown away.
    pub durable: bool,
    /// How long to wait for the server to accept connections.
    pub start_timeout: Duration,
    /// Addresses to listen on besides 127.0.0.1 (the port is the same),
    /// e.g. the one a Kubernetes node's pods reach this machine on.
    pub also_listen: Vec<String>,
    /// Networks whose connections are trusted besides loopback, e.g. the pod CIDR.
    pub also_trust: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            parent_dir: std::env::temp_dir(),
            durable: false,
            start_timeout: Duration::from_secs(30),
            also_listen: Vec::new(),
            also_trust: Vec::new(),
        }
    }
}

/// A running throwaway cluster. Dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct EphemeralPostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    user: ServerUser,
    watchdog: Child,
    // Closing this is the stop signal for the watchdog.
    stdin: Option<ChildStdin>,
}

const WATCHDOG: &str = r#"
dir=$1; shift
"$@" >"$dir/postgres.log" 2>&1 &
pid=$!
cat >/dev/null
kill -INT "$pid" 2>/dev/null
wait "$pid"
# A server restarted by pg_ctl is no child of ours: stop it by its pid file.
if [ -f "$dir/data/postmaster.pid" ]; then
    kill -INT "$(head -n 1 "$dir/data/postmaster.pid")" 2>/dev/null
    i=0
    while [ -f "$dir/data/postmaster.pid" ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i+1)); done
fi
rm -rf "$dir"
"#;

impl EphemeralPostgres {
    /// Creates and starts a cluster. Blocks for about a second.
    pub fn start(options: &Options) -> Result<Self, Error> {
        let bin = find_bin_dir().ok_or(Error::BinariesNotFound)?;
        let user = ServerUser::detect()?;
        std::fs::create_dir_all(&options.parent_dir)?;
        // Another process may take the port between our probe and the bind;
        // then the server exits at once and we start over on another port.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = tempfile::Builder::new()
                .prefix("orders-center-pg-")
                .tempdir_in(&options.parent_dir)?
                .keep();
            match Self::init_and_spawn(&bin, &user, &dir, options) {
                Err(Error::Start(_)) if attempt < 3 => continue,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    fn init_and_spawn(
        bin: &Path,
        user: &ServerUser,
        dir: &Path,
        options: &Options,
    ) -> Result<Self, Error> {
        user.give(dir)?;
        let data = dir.join("data");
        let out = user
            .command(&bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(Error::Initdb(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }

        if !options.also_trust.is_empty() {
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))?;
            for network in &options.also_trust {
                io::Write::write_all(
                    &mut hba,
                    format!("host all all {network} trust\n").as_bytes(),
                )?;
            }
        }
        let listen = std::iter::once("127.0.0.1")
            .chain(options.also_listen.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(",");
        let port = free_port()?;
        let mut server = user.command(&bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            .args([
                "-c",
                &format!("listen_addresses={listen}"),
                "-c",
                "max_connections=300",
                // Benchmarks time commit to commit.
                "-c",
                "track_commit_timestamp=on",
            ]);
        if !options.durable {
            server.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
            server.args(["-c", "full_page_writes=off"]);
        }
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("ephemeral-pg")
            .arg(dir)
            .arg(server.get_program())
            .args(server.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Keep the terminal's Ctrl-C away from the server: the owner
            // decides when it stops, after its own clean shutdown.
            .process_group(0)
            .spawn()?;
        let stdin = watchdog.stdin.take();
        let mut pg = Self {
            dir: dir.to_owned(),
            port,
            bin: bin.to_owned(),
            user: user.clone(),
            watchdog,
            stdin,
        };
        // On failure, dropping `pg` stops the server and removes `dir`.
        pg.wait_ready(&data, options.start_timeout)
            .map_err(Error::Start)?;
        Ok(pg)
    }

    fn wait_ready(&mut self, data: &Path, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let pid_file = data.join("postmaster.pid");
        loop {
            // Line 8 of postmaster.pid turns to "ready" once connections are accepted.
            if let Ok(text) = std::fs::read_to_string(&pid_file) {
                if text.lines().nth(7).is_some_and(|l| l.trim() == "ready") {
                    return Ok(());
                }
            }
            let exited = matches!(self.watchdog.try_wait(), Ok(Some(_)));
            let log = || {
                let mut s = String::new();
                let _ = std::fs::File::open(self.dir.join("postgres.log"))
                    .and_then(|mut f| f.read_to_string(&mut s));
                s.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
            };
            if exited || self.server_gone(&pid_file) {
                return Err(format!("server exited: {}", log()));
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after {timeout:?}: {}", log()));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    // The log shows a fatal start error (port in use) before the pid file is ready.
    fn server_gone(&self, pid_file: &Path) -> bool {
        !pid_file.exists()
            && std::fs::read_to_string(self.dir.join("postgres.log"))
                .is_ok_and(|l| l.contains("FATAL"))
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the data, socket and log; gone after drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A URL for database `db` as superuser `postgres`.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A URL for the default `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Restarts the server with `pg_ctl restart -m fast`: sessions are cut,
    /// in-flight transactions roll back, and the server is back on the same
    /// port when this returns. For fault tests.
    pub fn restart_fast(&self) -> Result<(), Error> {
        let out = self
            .user
            .command(&self.bin.join("pg_ctl"))
            .args(["restart", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres-restarted.log"))
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(Error::Start(format!(
                "pg_ctl restart: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Stops the server and removes its directory, waiting until both are done.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        if self.stdin.take().is_some() {
            self.watchdog.wait()?;
        }
        Ok(())
    }
}

impl Drop for EphemeralPostgres {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Who the server runs as. `initdb` refuses root, so as root we switch to the
/// `postgres` account that Debian's package creates.
#[derive(Debug, Clone)]
enum ServerUser {
    Current,
    Postgres { uid: u32, gid: u32 },
}

impl ServerUser {
    fn detect() -> Result<Self, Error> {
        if effective_uid()? != 0 {
            return Ok(Self::Current);
        }
        let passwd = std::fs::read_to_string("/etc/passwd")?;
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&"postgres"))
            .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
            .map(|(uid, gid)| Self::Postgres { uid, gid })
            .ok_or(Error::NoPostgresUser)
    }

    fn give(&self, dir: &Path) -> io::Result<()> {
        if let Self::Postgres { uid, gid } = self {
            std::os::unix::fs::chown(dir, Some(*uid), Some(*gid))?;
        }
        Ok(())
    }

    fn command(&self, program: &Path) -> Command {
        match self {
            Self::Current => Command::new(program),
            // setpriv execs in place, so the watchdog's `$!` is the server itself.
            Self::Postgres { .. } => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                    .arg(program);
                c
            }
        }
    }
}

fn effective_uid() -> io::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| io::Error::other("no Uid line in /proc/self/status"))
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where `initdb` and `postgres` live: `$PG_BIN_DIR`, then `$PATH`, then the
/// newest Debian version directory.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("PG_BIN_DIR").map(PathBuf::from) {
        return has_both(&d).then_some(d);
    }
    if let Some(d) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| has_both(d))
    {
        return Some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_both(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn starts_a_reachable_server_and_removes_it_on_drop() {
        if find_bin_dir().is_none() {
            panic!("PostgreSQL binaries are required for this test; see README");
        }
        let pg = EphemeralPostgres::start(&Options::default()).unwrap();
        let dir = pg.dir().to_owned();
        assert!(dir.join("data/PG_VERSION").is_file());
        // An SSLRequest gets a one-byte answer from a live server.
        let mut s = TcpStream::connect(("127.0.0.1", pg.port())).unwrap();
        s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).unwrap();
        assert!(matches!(answer[0], b'N' | b'S'));
        drop(s);
        let port = pg.port();
        drop(pg);
        assert!(!dir.exists(), "directory should be removed");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    fn answers_ssl_request(port: u16) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let mut answer = [0u8; 1];
        s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).is_ok() && s.read_exact(&mut answer).is_ok()
    }

    #[test]
    fn a_restarted_server_comes_back_on_its_port_and_is_still_removed_on_drop() {
        let pg = EphemeralPostgres::start(&Options::default()).unwrap();
        let pid_file = pg.dir().join("data/postmaster.pid");
        let first_pid = std::fs::read_to_string(&pid_file).unwrap();
        pg.restart_fast().unwrap();
        let second_pid = std::fs::read_to_string(&pid_file).unwrap();
        assert_ne!(first_pid.lines().next(), second_pid.lines().next());
        assert!(answers_ssl_request(pg.port()));
        let (dir, port) = (pg.dir().to_owned(), pg.port());
        drop(pg);
        assert!(!dir.exists(), "directory should be removed");
        assert!(
            !answers_ssl_request(port),
            "the restarted server still runs"
        );
    }
}

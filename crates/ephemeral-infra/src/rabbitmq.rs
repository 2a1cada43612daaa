//! A RabbitMQ node of its own: Debian's `rabbitmq-server` with its own node
//! name, ports, Erlang port mapper, cookie and data directory, no plugins.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::watchdog::{free_port, run_dir, with_retries, Watchdog};
use crate::{Error, Result};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A running throwaway RabbitMQ node. Dropping it kills the node and its
/// port mapper and deletes its directory.
#[derive(Debug)]
pub struct RabbitMq {
    port: u16,
    dir: PathBuf,
    watchdog: Watchdog,
}

impl RabbitMq {
    /// Starts a node and waits until it answers AMQP (about 5–10 s).
    pub fn start() -> Result<Self> {
        Self::start_also_on(None)
    }

    /// Starts a node that also listens on `address` (same port), where
    /// `guest` may log in too: for pods of a one-node cluster on this machine.
    pub fn start_also_on(address: Option<&str>) -> Result<Self> {
        if !Path::new(SERVER).is_file() {
            return Err(Error::Missing {
                program: SERVER.into(),
                hint: "apt-get install rabbitmq-server",
            });
        }
        with_retries(|| Self::try_start(address))
    }

    fn try_start(address: Option<&str>) -> Result<Self> {
        let dir = run_dir("rabbitmq-")?;
        let (port, dist, epmd) = (free_port()?, free_port()?, free_port()?);
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\n");
        if let Some(address) = address {
            conf += &format!("listeners.tcp.2 = {address}:{port}\nloopback_users = none\n");
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        let mut server = Command::new(SERVER);
        server
            // A node that crashes writes its MnesiaCore dump into its
            // working directory: keep it in the run's, not the caller's.
            .current_dir(&dir)
            // The Erlang cookie is written to and read from $HOME.
            .env("HOME", &dir)
            .env("RABBITMQ_NODENAME", format!("rabbit-{port}@localhost"))
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("ERL_EPMD_PORT", epmd.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"));
        // The node starts a port mapper daemon of its own; stop it too.
        let after = format!("epmd -port {epmd} -kill");
        let mut watchdog =
            Watchdog::spawn(&server, &dir.join("server.log"), Some(&dir), Some(&after))?;
        watchdog.wait_until("rabbitmq", Duration::from_secs(90), || answers_amqp(port))?;
        Ok(Self {
            port,
            dir,
            watchdog,
        })
    }

    /// The AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`; guest may log in from loopback.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's directory, deleted when it stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Freezes the node (SIGSTOP to its process group): connections
    /// stay open and go silent, the harshest kind of outage for a client.
    pub fn pause(&self) -> Result<()> {
        self.watchdog.signal("STOP")
    }

    /// Thaws the node after [`pause`](Self::pause).
    pub fn resume(&self) -> Result<()> {
        self.watchdog.signal("CONT")
    }

    /// Stops the node, waiting until its files are gone.
    pub fn stop(mut self) {
        self.watchdog.stop();
    }
}

/// The listener opens only when the broker has booted: a protocol header
/// then gets a Connection.Start method frame (frame type 1).
fn answers_amqp(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut frame_type = [0u8; 1];
    s.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && s.read_exact(&mut frame_type).is_ok()
        && frame_type[0] == 1
}

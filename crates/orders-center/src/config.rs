//! The whole configuration: one clap struct, every flag also read from env.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// orders-center: the single source of truth for orders, delivering every
/// save to 1C through a transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "orders-center", version)]
pub struct Config {
    /// PostgreSQL URL. `dev` starts a throwaway server when it is not set.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Most database connections this process opens.
    #[arg(
        long,
        env = "DATABASE_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub database_max_connections: u32,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The roles of the binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (and /metrics on the same port).
    Api(ApiArgs),
    /// Apply the database migrations and exit.
    Migrate,
    /// Everything in one process for a laptop: a throwaway PostgreSQL unless
    /// DATABASE_URL is set, migrations, and the API.
    Dev(DevArgs),
}

/// Flags of `api`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Apply migrations before serving.
    #[arg(long, env = "MIGRATE")]
    pub migrate: bool,

    #[command(flatten)]
    pub http: HttpArgs,
}

/// Flags of `dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Apply migrations before serving (`--migrate=false` to skip).
    #[arg(long, env = "MIGRATE", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub migrate: bool,

    #[command(flatten)]
    pub http: HttpArgs,
}

/// Limits of every HTTP listener.
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub body_limit_bytes: usize,

    /// Longest a request may take, e.g. `30s`.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

impl HttpArgs {
    /// The API limits these flags describe.
    pub fn api_config(&self) -> api::ApiConfig {
        api::ApiConfig {
            body_limit: self.body_limit_bytes,
            request_timeout: self.request_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn dev_migrates_by_default_and_can_be_told_not_to() {
        let dev = |args: &[&str]| match Config::try_parse_from(args).unwrap().command {
            Command::Dev(d) => d,
            other => panic!("parsed {other:?}"),
        };
        assert!(dev(&["orders-center", "dev"]).migrate);
        assert!(!dev(&["orders-center", "dev", "--migrate=false"]).migrate);
        let api =
            Config::try_parse_from(["orders-center", "api", "--request-timeout", "2s"]).unwrap();
        match api.command {
            Command::Api(a) => {
                assert!(!a.migrate);
                assert_eq!(a.http.request_timeout, Duration::from_secs(2));
                assert_eq!(a.listen.port(), 8080);
            }
            other => panic!("parsed {other:?}"),
        }
    }
}

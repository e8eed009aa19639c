//! The command line: `outboxd run | migrate | check --config PATH`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Transactional outbox relay: forwards committed outbox rows from PostgreSQL to RabbitMQ, at-least-once."
)]
pub struct Cli {
    /// Log format: "text" or "json" (overrides [log] format in the config).
    #[arg(long, global = true, env = "OUTBOXD_LOG_FORMAT", value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Create the outbox table, indexes and NOTIFY trigger in every source database (idempotent).
    Migrate(ConfigArg),
    /// Check the config, the broker, each database, table, privileges and exchange; non-zero exit on failure.
    Check(ConfigArg),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Path to the TOML config file.
    #[arg(short, long, env = "OUTBOXD_CONFIG", value_name = "PATH")]
    pub config: PathBuf,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

impl Command {
    pub fn config_path(&self) -> &std::path::Path {
        match self {
            Command::Run(a) | Command::Migrate(a) | Command::Check(a) => &a.config,
        }
    }
}

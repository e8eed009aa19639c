//! The command line: `outboxd run | migrate | check | status | pause |
//! resume | dead-letters | slot --config PATH`, and `outboxd health [--url
//! URL]`, which reads no config.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{LogFormat, NotOneOf};
use crate::health::{self, HealthUrl};

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
    #[command(flatten)]
    WithConfig(ConfigCommand),
    /// Ask a running relay's /healthz: exit 0 if it answers 200, 1 otherwise (for Docker's HEALTHCHECK).
    Health {
        /// The relay's metrics address (metrics.listen); /healthz is appended.
        #[arg(long, env = "OUTBOXD_HEALTH_URL", value_name = "URL", default_value = health::DEFAULT_URL)]
        url: HealthUrl,
    },
}

/// The commands that read a config file.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Run the relay until SIGTERM, SIGINT or SIGHUP (each drains, then exits; no reload).
    Run(ConfigArg),
    /// Create the outbox table, indexes and NOTIFY trigger in every source database (idempotent).
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Build the missing indexes of an existing outbox table with CREATE INDEX CONCURRENTLY first (no write lock on a large live table; slower, one index at a time).
        #[arg(long)]
        concurrently: bool,
        /// How long each statement may wait for a lock on the outbox table (its DDL waits behind open transactions, and inserts queue behind it while it waits); past it migrate stops with exit 1 and changes nothing. 0 waits as long as it takes.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
        lock_timeout: std::time::Duration,
    },
    /// Check the config, the broker, each database, table, privileges and exchange; non-zero exit on failure.
    Check(ConfigArg),
    /// Per source, from the database: backlog, oldest pending age, held rows, dead letters, relays and their partitions, paused or not, the slot; exit 1 if a source cannot be read.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table (field names in the README).
        #[arg(long)]
        json: bool,
    },
    /// Stop every relay on a source's table from claiming (recorded in the database; rows keep accumulating, nothing is lost).
    Pause(SourceArg),
    /// Let the relays of a paused source claim again.
    Resume(SourceArg),
    /// List, replay or purge parked rows (the dead-letter table).
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Replication slots of capture = "wal" sources.
    #[command(subcommand)]
    Slot(Slot),
}

#[derive(Debug, Subcommand)]
pub enum Slot {
    /// Drop a source's replication slot (without --yes: say what would be dropped and how much WAL it keeps).
    Drop {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        source: String,
        /// Really drop it.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// Print parked rows: source, id, event type, attempts, when parked, reason, last error.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// At most this many rows per source.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Move parked rows back into the outbox (same id and dedup key, attempts reset).
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        source: String,
        #[command(flatten)]
        which: Which,
    },
    /// Delete parked rows for good (asks for --yes).
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        source: String,
        #[command(flatten)]
        which: Which,
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
}

/// `--id N [--id M ...]` or `--all`, exactly one of them.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// Row id (repeat for several).
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<i64>,
    /// Every parked row of the source.
    #[arg(long)]
    pub all: bool,
}

/// `-c PATH --source S`.
#[derive(Debug, Args)]
pub struct SourceArg {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The source's name in the config.
    #[arg(long)]
    pub source: String,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Path to the TOML config file.
    #[arg(short, long, env = "OUTBOXD_CONFIG", value_name = "PATH")]
    pub config: PathBuf,
}

fn parse_log_format(s: &str) -> Result<LogFormat, NotOneOf> {
    s.parse()
}

impl ConfigCommand {
    pub fn config_path(&self) -> &std::path::Path {
        match self {
            ConfigCommand::Run(a) | ConfigCommand::Check(a) => &a.config,
            ConfigCommand::DeadLetters(
                DeadLetters::List { config, .. }
                | DeadLetters::Replay { config, .. }
                | DeadLetters::Purge { config, .. },
            )
            | ConfigCommand::Migrate { config, .. }
            | ConfigCommand::Slot(Slot::Drop { config, .. })
            | ConfigCommand::Status { config, .. }
            | ConfigCommand::Pause(SourceArg { config, .. })
            | ConfigCommand::Resume(SourceArg { config, .. }) => &config.config,
        }
    }
}

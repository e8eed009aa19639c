//! What each subcommand does once the command line is parsed: the one
//! entry point the binary calls ([`run`]), returning one [`Error`] that
//! knows its exit code.

use clap::Parser as _;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, ConfigCommand, DeadLetters, Slot, SourceArg, Which};
use crate::config::{Config, ConfigError, LogFormat};
use crate::dead_letters::{self, Selection};
use crate::health::{self, HealthError, HealthUrl};
use crate::source::command::SourceCommandError;
use crate::telemetry::ErrorChain;
use crate::{app, check, migrate, pause, shutdown, status, telemetry};

/// Every way a command can fail, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Logging(#[from] telemetry::LogError),
    #[error(transparent)]
    Run(#[from] app::AppError),
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    /// `dead-letters`, `slot drop`, `pause` and `resume`.
    #[error(transparent)]
    SourceCommand(#[from] SourceCommandError),
    #[error("{0} check(s) failed")]
    Check(usize),
    #[error("cannot read source(s) {}", .0.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "))]
    Status(Vec<String>),
    #[error("not healthy: {0}")]
    Unhealthy(#[source] HealthError),
}

impl Error {
    /// 0 is success; 1 a failure; 2 bad usage or a bad config (clap exits
    /// 2 itself on bad usage); 3 `run` stopped at the drain timeout with
    /// claimed rows left in the outbox, distinct so a supervisor or an
    /// operator can tell it from a clean stop.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Logging(_) => 2,
            Error::Run(app::AppError::Abandoned { .. }) => 3,
            Error::Runtime(_)
            | Error::Signals(_)
            | Error::Run(_)
            | Error::Migrate(_)
            | Error::SourceCommand(_)
            | Error::Check(_)
            | Error::Status(_)
            | Error::Unhealthy(_) => 1,
        }
    }

    /// Says what went wrong where the user looks: the log once logging
    /// runs (for `run` and `migrate`), standard error otherwise.
    pub fn report(&self) {
        let error = ErrorChain(self);
        match self {
            Error::Run(app::AppError::Abandoned { .. }) => {
                tracing::warn!(%error, "outboxd stopped before its drain finished");
            }
            Error::Run(_) => tracing::error!(%error, "outboxd cannot run"),
            Error::Migrate(_) => tracing::error!(%error, "migrate failed"),
            _ => eprintln!("outboxd: {error}"),
        }
    }
}

/// Parses the command line and runs the command on a new runtime.
pub fn main() -> Result<(), Error> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?
        .block_on(run(cli))
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::WithConfig(command) => run_with_config(command, cli.log_format).await,
        // No config and no logging: it only asks a running relay.
        Command::Health { url } => health_command(&url).await,
    }
}

/// Runs a command that reads the config: signals first (for `run`), then
/// the config, then logging, then the command.
async fn run_with_config(
    command: ConfigCommand,
    log_format: Option<LogFormat>,
) -> Result<(), Error> {
    // Signal handlers first: as PID 1, an unhandled SIGTERM is ignored.
    let drain = match &command {
        ConfigCommand::Run(_) => Some(shutdown::install().map_err(Error::Signals)?),
        _ => None,
    };
    let path = command.config_path().to_owned();
    let config = Config::load(&path)?;
    let format = log_format.unwrap_or(config.log.format);
    telemetry::init(format, &config.log.level)?;
    match command {
        ConfigCommand::Run(_) => {
            app::run(config, drain.unwrap_or_else(CancellationToken::new)).await?;
        }
        ConfigCommand::Migrate {
            concurrently,
            lock_timeout,
            ..
        } => migrate::run(&config, concurrently, lock_timeout).await?,
        ConfigCommand::DeadLetters(action) => dead_letters_command(&config, action).await?,
        ConfigCommand::Slot(Slot::Drop { source, yes, .. }) => {
            println!(
                "{}",
                crate::wal::slot::drop_slot(&config, &source, yes).await?
            );
        }
        ConfigCommand::Status { json, .. } => {
            let unreadable = status::run(&config, json, std::io::stdout()).await;
            if !unreadable.is_empty() {
                return Err(Error::Status(unreadable));
            }
        }
        ConfigCommand::Pause(SourceArg { source, .. }) => {
            println!("{}", pause::set(&config, &source, true).await?);
        }
        ConfigCommand::Resume(SourceArg { source, .. }) => {
            println!("{}", pause::set(&config, &source, false).await?);
        }
        ConfigCommand::Check(_) => {
            let failures =
                check::run(&config, &path.display().to_string(), std::io::stdout()).await;
            if failures > 0 {
                return Err(Error::Check(failures));
            }
        }
    }
    Ok(())
}

async fn health_command(url: &HealthUrl) -> Result<(), Error> {
    health::check(url).await.map_err(Error::Unhealthy)?;
    println!("healthy: {url} answered 200");
    Ok(())
}

async fn dead_letters_command(
    config: &Config,
    action: DeadLetters,
) -> Result<(), SourceCommandError> {
    let which = |w: Which| {
        if w.all {
            Selection::All
        } else {
            Selection::Ids(w.ids)
        }
    };
    match action {
        DeadLetters::List { source, limit, .. } => {
            dead_letters::list(config, source.as_deref(), limit, std::io::stdout()).await
        }
        DeadLetters::Replay {
            source, which: w, ..
        } => {
            let replayed = dead_letters::replay(config, &source, &which(w)).await?;
            println!(
                "replayed {} row(s) of source {source:?} into the outbox: {:?}",
                replayed.done.len(),
                replayed.done
            );
            replayed.complete(&source)
        }
        DeadLetters::Purge {
            source,
            which: w,
            yes,
            ..
        } => {
            let n = dead_letters::purge(config, &source, &which(w), yes).await?;
            println!("purged {n} dead letter(s) of source {source:?}");
            Ok(())
        }
    }
}

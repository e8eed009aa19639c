//! The `outboxd` binary: parse the command line, load the config, start
//! logging, dispatch, and map the result to an exit code
//! (0 ok, 1 failure, 2 bad usage or bad config, 3 `run` stopped at the
//! drain timeout with rows left in the outbox).

use std::process::ExitCode;

use clap::Parser;
use outboxd::cli::{Cli, Command, DeadLetters, Which};
use outboxd::config::Config;
use outboxd::dead_letters::{self, DeadLetterError, Selection};
use outboxd::{app, check, migrate, shutdown, telemetry};

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;
/// `run` stopped at the drain timeout with claimed rows unpublished (they
/// stay in the outbox): distinct from a clean stop, so a supervisor or an
/// operator can tell.
const EXIT_ABANDONED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("outboxd: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(try_main(cli))
}

async fn try_main(cli: Cli) -> ExitCode {
    // Signal handlers first: as PID 1, an unhandled SIGTERM is ignored.
    let drain = match &cli.command {
        Command::Run(_) => match shutdown::install() {
            Ok(token) => Some(token),
            Err(err) => {
                eprintln!("outboxd: cannot install signal handlers: {err}");
                return ExitCode::from(EXIT_FAILURE);
            }
        },
        _ => None,
    };
    let path = cli.command.config_path().to_owned();
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("outboxd: config error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let format = cli.log_format.unwrap_or(config.log.format);
    if let Err(err) = telemetry::init(format, &config.log.level) {
        eprintln!("outboxd: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match cli.command {
        Command::Run(_) => {
            let drain = drain.unwrap_or_default();
            match app::run(config, drain).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err @ app::AppError::Abandoned { .. }) => {
                    tracing::warn!(error = %err, "outboxd stopped before its drain finished");
                    ExitCode::from(EXIT_ABANDONED)
                }
                Err(err) => {
                    tracing::error!(error = %err, "outboxd cannot run");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Migrate(_) => match migrate::run(&config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "migrate failed");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::DeadLetters(action) => match dead_letters_cmd(&config, action).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("outboxd: {err}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Check(_) => {
            let failures =
                check::run(&config, &path.display().to_string(), std::io::stdout()).await;
            if failures == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("outboxd: {failures} check(s) failed");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}

async fn dead_letters_cmd(config: &Config, action: DeadLetters) -> Result<(), DeadLetterError> {
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
            let wanted = which(w);
            let done = dead_letters::replay(config, &source, &wanted).await?;
            println!(
                "replayed {} row(s) of source {source:?} into the outbox: {done:?}",
                done.len()
            );
            if let Selection::Ids(ids) = &wanted {
                let missing: Vec<&i64> = ids.iter().filter(|id| !done.contains(id)).collect();
                if !missing.is_empty() {
                    return Err(DeadLetterError::Refused(format!(
                        "no dead letter with id {missing:?} in source {source:?}"
                    )));
                }
            }
            Ok(())
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

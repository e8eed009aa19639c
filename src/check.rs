//! `outboxd check`: everything `run` needs, checked once, one line per check.
//!
//! The config has already loaded (a config error never gets here). Then:
//! the broker answers; each source database answers; its table exists with
//! every column of `sql/outbox.sql` at the right type; the relay's role has
//! the privileges it needs; the NOTIFY trigger is in place (a warning only:
//! without it the relay still works, by polling); the default exchange exists.
//! For a `capture = "wal"` source also: wal_level = logical, the role may
//! replicate, the publication and the slot are there and usable, and a
//! warning while max_slot_wal_keep_size leaves a slot's WAL unbounded.
//! For a mapped table (`layout = "debezium"`), also its columns and its
//! forwarding trigger (`check/mapped.rs`).
//! Sources are checked concurrently (a few at a time) and reported in
//! config order, each source's lines together.

mod mapped;
mod table;
mod wal;

use std::io::Write;
use std::sync::Arc;

use lapin::Connection;
use lapin::types::ShortString;
use tokio::sync::Semaphore;

use crate::config::{Config, SourceConfig};
use crate::sink::rabbitmq::{Broker, exchange_exists};
use crate::telemetry::ErrorChain;
use crate::tls::Trust;

/// The columns the relay reads or writes, with their PostgreSQL types.
pub const COLUMNS: [(&str, &str); 15] = [
    ("id", "bigint"),
    ("aggregate_type", "text"),
    ("aggregate_id", "text"),
    ("event_type", "text"),
    ("payload", "jsonb"),
    ("headers", "jsonb"),
    ("dedup_key", "text"),
    ("exchange", "text"),
    ("routing_key", "text"),
    ("created_at", "timestamp with time zone"),
    ("attempts", "integer"),
    ("available_at", "timestamp with time zone"),
    ("last_error", "text"),
    ("published_at", "timestamp with time zone"),
    ("held", "boolean"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

struct Report<W: Write> {
    out: W,
    failures: usize,
}

impl<W: Write> Report<W> {
    fn line(&mut self, level: Level, what: &str, detail: &str) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        if level == Level::Fail {
            self.failures += 1;
        }
        // A closed stdout must not turn a check into a panic.
        let _ = writeln!(self.out, "{tag} {what}: {detail}");
    }
}

/// The longest any one check may take (it includes the database connect,
/// itself bounded by `source::DB_TIMEOUT`).
const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(40);

/// Sources checked at once: a few silent hosts cost one timeout, not one
/// each, and a long list does not open a connection to every database at once.
const SOURCES_AT_ONCE: usize = 8;

/// Connects to every broker node, one line each; returns a connection to
/// the first that answered. With several nodes, one that does not answer
/// is a warning while another does (the relay connects to that one).
async fn check_broker<W: Write>(r: &mut Report<W>, config: &Config) -> Option<Arc<Connection>> {
    let rabbit = &config.rabbitmq;
    let count = rabbit.nodes.len();
    // Encrypted but unauthenticated is worth a warning every time.
    let unverified = rabbit
        .tls
        .as_ref()
        .is_some_and(|t| t.trust == Trust::Anyone);
    let over = if rabbit.tls.is_some() {
        " over TLS"
    } else {
        ""
    };
    // All at once: a silent node costs one connect timeout, not one each.
    let attempts: Vec<_> = rabbit
        .nodes
        .iter()
        .map(|node| {
            let (rabbit, node) = (rabbit.clone(), node.clone());
            tokio::spawn(async move { Broker::connect(&rabbit, &node).await })
        })
        .collect();
    let mut results = Vec::with_capacity(attempts.len());
    for attempt in attempts {
        results.push(attempt.await.map_err(|e| {
            lapin::Error::from(std::io::Error::other(format!("the check task failed: {e}")))
        }));
    }
    let results: Vec<_> = results.into_iter().map(|r| r.and_then(|r| r)).collect();
    let answered = results.iter().filter(|r| r.is_ok()).count();
    let mut first = None;
    for ((i, result), node) in results.into_iter().enumerate().zip(&rabbit.nodes) {
        let what = if count == 1 {
            "rabbitmq".to_owned()
        } else {
            format!("rabbitmq node {} of {count}", i + 1)
        };
        match result {
            Ok(conn) => {
                let level = if unverified { Level::Warn } else { Level::Ok };
                r.line(
                    level,
                    &what,
                    &format!("connected to {}", rabbit.describe_node(i)),
                );
                match first {
                    None => first = Some(Arc::new(conn)),
                    // A closed connection is all we want; a failure to say
                    // goodbye changes nothing about the check.
                    Some(_) => {
                        let _ = conn.close(200, "outboxd check done".into()).await;
                    }
                }
            }
            Err(e) => {
                let level = if answered > 0 {
                    Level::Warn
                } else {
                    Level::Fail
                };
                r.line(
                    level,
                    &what,
                    &format!(
                        "cannot connect to {}{over}: {}",
                        node.display,
                        ErrorChain(&e)
                    ),
                );
            }
        }
    }
    first
}

/// Runs every check, printing to `out`; returns the number of failures.
pub async fn run<W: Write>(config: &Config, config_path: &str, out: W) -> usize {
    let mut r = Report { out, failures: 0 };
    r.line(
        Level::Ok,
        "config",
        &format!("{config_path} is valid ({} sources)", config.sources.len()),
    );
    let broker = check_broker(&mut r, config).await;
    // Each source writes its lines into a buffer of its own; the buffers
    // are printed in config order, each as soon as it and those before it
    // are done, so a source's lines stay together.
    let at_once = Arc::new(Semaphore::new(SOURCES_AT_ONCE));
    let checks: Vec<_> = config
        .sources
        .iter()
        .map(|source| {
            let (source, broker, at_once) = (source.clone(), broker.clone(), at_once.clone());
            let name = source.name.clone();
            let task = tokio::spawn(async move {
                // The semaphore is never closed, so the permit always comes.
                let _permit = at_once.acquire_owned().await;
                check_one(&source, broker.as_deref()).await
            });
            (name, task)
        })
        .collect();
    for (name, task) in checks {
        match task.await {
            Ok(done) => {
                r.failures += done.failures;
                // A closed stdout must not turn a check into a panic.
                let _ = r.out.write_all(&done.out);
            }
            Err(err) => r.line(
                Level::Fail,
                &format!("source {name}"),
                &format!("the check itself failed: {err}"),
            ),
        }
    }
    if let Some(conn) = broker {
        let _ = tokio::time::timeout(STEP_TIMEOUT, conn.close(200, "check done".into())).await;
    }
    r.failures
}

/// Every check of one source, as lines in a buffer.
async fn check_one(source: &SourceConfig, broker: Option<&Connection>) -> Report<Vec<u8>> {
    let mut r = Report {
        out: Vec::new(),
        failures: 0,
    };
    // Every step is bounded: a host that accepts a connection and then
    // says nothing is a failure to report, not a hang.
    if tokio::time::timeout(STEP_TIMEOUT, check_source(&mut r, source))
        .await
        .is_err()
    {
        r.line(
            Level::Fail,
            &format!("source {} database", source.name),
            &format!("no answer within {STEP_TIMEOUT:?}"),
        );
    }
    let what = format!("source {} exchange", source.name);
    if source.exchange.is_empty() {
        r.line(
            Level::Ok,
            &what,
            "the default exchange (\"\") always exists",
        );
        return r;
    }
    let Some(conn) = broker else {
        r.line(Level::Fail, &what, "not checked: no broker connection");
        return r;
    };
    // The exchange name was validated at load (at most 255 bytes, AMQP characters).
    let name = ShortString::try_new(source.exchange.clone()).unwrap_or_default();
    match tokio::time::timeout(STEP_TIMEOUT, exchange_exists(conn, &name)).await {
        Err(_) => r.line(
            Level::Fail,
            &what,
            &format!("no answer within {STEP_TIMEOUT:?}"),
        ),
        Ok(Ok(true)) => r.line(Level::Ok, &what, &format!("{:?} exists", source.exchange)),
        Ok(Ok(false)) => r.line(
            Level::Fail,
            &what,
            &format!(
                "{:?} does not exist; declare it (the relay never declares exchanges)",
                source.exchange
            ),
        ),
        Ok(Err(e)) => r.line(Level::Fail, &what, &e.to_string()),
    }
    r
}

async fn check_source<W: Write>(r: &mut Report<W>, source: &SourceConfig) {
    let what = |part: &str| format!("source {} {part}", source.name);
    let client = match crate::source::connect(source).await {
        Ok(client) => {
            r.line(
                Level::Ok,
                &what("database"),
                &format!(
                    "connected to {} (sslmode {})",
                    source.database_display,
                    source.tls.name()
                ),
            );
            client
        }
        Err(e) => {
            r.line(
                Level::Fail,
                &what("database"),
                &format!(
                    "cannot connect to {} (sslmode {}): {}",
                    source.database_display,
                    source.tls.name(),
                    ErrorChain(&e)
                ),
            );
            return;
        }
    };
    if let Err(e) = table::check(r, &client, source).await {
        r.line(
            Level::Fail,
            &what("table"),
            &format!("query failed: {}", ErrorChain(&e)),
        );
    }
    if let Some(map) = &source.mapping
        && let Err(e) = mapped::check(r, &client, source, map).await
    {
        r.line(
            Level::Fail,
            &what("columns"),
            &format!("query failed: {}", ErrorChain(&e)),
        );
    }
    if let Some(wal) = source.capture.wal()
        && let Err(e) = wal::check(r, &client, source, wal).await
    {
        r.line(
            Level::Fail,
            &what("wal"),
            &format!("query failed: {}", ErrorChain(&e)),
        );
    }
}

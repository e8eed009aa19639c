//! `outboxd migrate`: create the outbox table, its indexes and its NOTIFY
//! trigger in every source database, from `sql/outbox.sql`; for a
//! `capture = "wal"` source also its publication, `outbox_emit()` and its
//! replication slot, from `sql/wal.sql`. Slots are made here only, never
//! by `run`. For a mapped table (`layout = "debezium"`), the relay's table
//! is made beside it, and the producers' table gets the trigger that
//! forwards its inserts (`crate::forward`), once its columns are checked.
//!
//! The same file works with psql by hand. psql fills in its `:"var"`
//! placeholders; here we do the same substitution ourselves, with names
//! from the config that were validated at load and are quoted again here.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tracing::info;

use crate::config::{Config, SourceConfig, WalCapture};
use crate::forward;
use crate::ident::{quote_ident, quote_literal};
use crate::source::ConnectError;
use crate::source::order::{IndexState, index_state};

const SQL: &str = include_str!("../sql/outbox.sql");
const WAL_SQL: &str = include_str!("../sql/wal.sql");
/// Where `sql/wal.sql` turns to the slot, which must be created outside
/// the transaction that wrote the rest.
const SLOT_MARK: &str = "-- outboxd: slot";
/// Creating a slot waits for every transaction with an xid that is already
/// running; a forgotten open transaction must not hang `migrate`.
const SLOT_TIMEOUT: &str = "60s";

/// Why `migrate` stopped at a source; the cause is the source of the
/// error (tokio-postgres keeps the server's own message one level further).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migrate failed for source {source_name:?} ({database}): cannot connect: {source}")]
    Connect {
        source_name: String,
        database: String,
        #[source]
        source: ConnectError,
    },
    #[error(
        "migrate failed for source {source_name:?} ({database}): cannot create replication slot {slot:?} \
         (it needs wal_level = logical, a free max_replication_slots entry, and waits for transactions \
         already running to end, at most {SLOT_TIMEOUT}): {source}"
    )]
    Slot {
        source_name: String,
        database: String,
        slot: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A mapped table whose columns do not fit `[source.columns]`: no
    /// trigger is written that would fail the producers' inserts.
    #[error(
        "migrate failed for source {source_name:?} ({database}): the table does not fit the column mapping: {problems}"
    )]
    Mapping {
        source_name: String,
        database: String,
        problems: String,
    },
    /// `--concurrently`: an index that a concurrent build left (or finds)
    /// not valid; migrate cannot tell a failed build from a running one.
    #[error(
        "migrate failed for source {source_name:?} ({database}): index {index} {problem}; unless a build of it is still running, DROP INDEX CONCURRENTLY {index} and run migrate again"
    )]
    InvalidIndex {
        source_name: String,
        database: String,
        index: String,
        problem: String,
    },
    /// A statement waited `lock_timeout` for a lock and gave up: its
    /// transaction is rolled back, nothing changed.
    #[error(
        "migrate failed for source {source_name:?} ({database}): could not lock table {table} within {timeout} \
         (an open transaction holds a lock on it, and producers' inserts queue behind migrate while it waits); \
         nothing was changed: run migrate again when the table is quieter, or give --lock-timeout more time"
    )]
    LockTimeout {
        source_name: String,
        database: String,
        table: String,
        timeout: String,
    },
    #[error("migrate failed for source {source_name:?} ({database}): {source}")]
    Sql {
        source_name: String,
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The migration script for one source, with every placeholder filled in.
pub fn render(source: &SourceConfig) -> String {
    fill(SQL, &table_vars(source))
}

/// `sql/wal.sql` for a `capture = "wal"` source: what goes in the
/// migration's transaction, and the slot's statement to run after it.
pub fn render_wal(source: &SourceConfig, wal: &WalCapture) -> (String, String) {
    let mut vars = table_vars(source);
    vars.push(("publication", wal.publication.clone()));
    vars.push(("slot", wal.slot.clone()));
    let sql = fill(WAL_SQL, &vars);
    match sql.split_once(SLOT_MARK) {
        Some((body, slot)) => (body.to_owned(), slot.to_owned()),
        // The mark is in the file this binary was built with (a test says so).
        None => (sql, String::new()),
    }
}

fn table_vars(source: &SourceConfig) -> Vec<(&'static str, String)> {
    let t = &source.table;
    let vars = [
        ("schema", t.schema.clone()),
        ("table", t.table.clone()),
        ("pending_index", t.derived("_pending_idx")),
        ("claim_index", t.derived("_claim_part_idx")),
        ("old_claim_index", t.derived("_claim_idx")),
        ("aggregate_index", t.derived("_aggregate_idx")),
        ("held_index", t.derived("_held_idx")),
        ("waiting_index", t.derived("_waiting_idx")),
        ("partition_index", t.derived("_partition_idx")),
        ("dead_aggregate_index", t.derived("_dead_aggregate_idx")),
        ("published_index", t.derived("_published_idx")),
        ("notify_trigger", t.derived("_notify")),
        ("notify_function", t.derived("_notify_fn")),
        ("wakeup_table", t.derived("_wakeup")),
        ("dead_table", t.derived("_dead")),
        ("channel", source.notify_channel.clone()),
    ];
    vars.to_vec()
}

fn fill(sql: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(sql.len());
    for line in sql.lines() {
        // psql meta-commands (\if, \set) only compute the defaults we fill in here.
        if line.starts_with('\\') {
            continue;
        }
        let mut line = line.to_owned();
        for (name, value) in vars {
            line = line.replace(&format!(":\"{name}\""), &quote_ident(value));
            line = line.replace(&format!(":'{name}'"), &quote_literal(value));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Migrates every source. `concurrently`: first build the indexes an
/// existing outbox table lacks with `CREATE INDEX CONCURRENTLY`, so that a
/// large live table is not locked against inserts while they build.
/// `lock_timeout`: how long a statement may wait for a lock (zero: no
/// limit).
pub async fn run(
    config: &Config,
    concurrently: bool,
    lock_timeout: Duration,
) -> Result<(), MigrateError> {
    for source in &config.sources {
        migrate_one(source, concurrently, lock_timeout).await?;
        info!(
            source = %source.name,
            database = %source.database_display,
            table = %source.table,
            channel = %source.notify_channel,
            "outbox table, indexes and trigger are in place"
        );
        if let Some(map) = &source.mapping {
            info!(
                source = %source.name,
                table = %map.table,
                trigger = %forward::trigger::trigger_name(map),
                "the mapped table forwards its inserts to the relay's table"
            );
        }
        if let Some(w) = source.capture.wal() {
            info!(
                source = %source.name,
                slot = %w.slot,
                publication = %w.publication,
                "publication, outbox_emit() and replication slot are in place"
            );
        }
    }
    Ok(())
}

/// The statements of the migration that `--concurrently` runs on their
/// own, before its transaction, on an existing table: the added columns
/// (metadata only, an instant each) and every index on the outbox table
/// itself, as (qualified index name, statement).
fn concurrent_steps(source: &SourceConfig) -> (Vec<String>, Vec<(String, String)>) {
    let table = source.table.quoted();
    let on_table = format!("ON {table} ");
    let schema = quote_ident(&source.table.schema);
    let mut columns = Vec::new();
    let mut indexes = Vec::new();
    // Comment lines go first: some have a ';' in their prose.
    let code: String = render(source)
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in code.split(';') {
        let statement = statement.trim();
        // Only the outbox table's own: the other tables may not exist yet.
        if statement.starts_with(&format!("ALTER TABLE {table} "))
            && statement.contains("ADD COLUMN IF NOT EXISTS")
        {
            columns.push(statement.to_owned());
        } else if let Some(rest) = statement.strip_prefix(CREATE_INDEX)
            && statement.contains(&on_table)
            && let Some(name) = rest.split_whitespace().next()
        {
            indexes.push((
                format!("{schema}.{name}"),
                format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS{rest}"),
            ));
        }
    }
    (columns, indexes)
}

const CREATE_INDEX: &str = "CREATE INDEX IF NOT EXISTS";

/// A database error of `source`'s migration, named by source and database;
/// a lock not granted within `lock_timeout` says so.
fn sql_error(
    source: &SourceConfig,
    lock_timeout: Duration,
) -> impl Fn(tokio_postgres::Error) -> MigrateError + Copy + '_ {
    move |e| {
        if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
            return MigrateError::LockTimeout {
                source_name: source.name.clone(),
                database: source.database_display.clone(),
                table: source.table.to_string(),
                timeout: humantime::format_duration(lock_timeout).to_string(),
            };
        }
        MigrateError::Sql {
            source_name: source.name.clone(),
            database: source.database_display.clone(),
            source: e,
        }
    }
}

/// The `lock_timeout` setting (0 turns it off).
fn lock_timeout_setting(lock_timeout: Duration) -> String {
    format!("lock_timeout = '{}ms'", lock_timeout.as_millis())
}

/// `--concurrently`: builds the indexes an existing outbox table lacks, one
/// at a time, outside any transaction. A new table needs none of this.
async fn build_concurrently(
    client: &tokio_postgres::Client,
    source: &SourceConfig,
    lock_timeout: Duration,
) -> Result<(), MigrateError> {
    let sql_error = sql_error(source, lock_timeout);
    let invalid = |index: &str, problem: String| MigrateError::InvalidIndex {
        source_name: source.name.clone(),
        database: source.database_display.clone(),
        index: index.to_owned(),
        problem,
    };
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1::text) IS NOT NULL",
            &[&source.table.quoted()],
        )
        .await
        .map_err(sql_error)?
        .get(0);
    if !exists {
        return Ok(());
    }
    let (columns, indexes) = concurrent_steps(source);
    // Adding a column takes the table's strongest lock for a moment, like
    // the plain migration: bounded the same way. The concurrent builds are
    // not: they block no insert, and one that gave up waiting would leave
    // an invalid index behind.
    if !columns.is_empty() {
        let bounded = format!(
            "SET {}; {}; RESET lock_timeout",
            lock_timeout_setting(lock_timeout),
            columns.join("; ")
        );
        let added = client.batch_execute(&bounded).await;
        if added.is_err() {
            let _ = client.batch_execute("RESET lock_timeout").await;
        }
        added.map_err(sql_error)?;
    }
    for (index, statement) in indexes {
        match index_state(client, &index).await.map_err(sql_error)? {
            IndexState::Valid => continue,
            IndexState::Invalid => {
                return Err(invalid(&index, "exists but is not valid".to_owned()));
            }
            IndexState::Missing => {}
        }
        info!(source = %source.name, %index, "building index concurrently");
        let started = std::time::Instant::now();
        if let Err(e) = client.batch_execute(&statement).await {
            return match index_state(client, &index).await {
                Ok(IndexState::Invalid) => Err(invalid(
                    &index,
                    format!(
                        "was left not valid by CREATE INDEX CONCURRENTLY ({})",
                        crate::telemetry::ErrorChain(&e)
                    ),
                )),
                _ => Err(sql_error(e)),
            };
        }
        info!(source = %source.name, %index, seconds = started.elapsed().as_secs_f64(), "index built");
    }
    Ok(())
}

async fn migrate_one(
    source: &SourceConfig,
    concurrently: bool,
    lock_timeout: Duration,
) -> Result<(), MigrateError> {
    let mut client = crate::source::connect(source)
        .await
        .map_err(|e| MigrateError::Connect {
            source_name: source.name.clone(),
            database: source.database_display.clone(),
            source: e,
        })?;
    let wal = source.capture.wal().map(|w| render_wal(source, w));
    let sql_error = sql_error(source, lock_timeout);
    // A mapped table's columns are checked first: a trigger that names a
    // missing column would fail every producer's insert.
    let forward = match &source.mapping {
        None => None,
        Some(map) => match forward::read_plan(&client, map).await.map_err(sql_error)? {
            Ok(plan) => Some(forward::trigger::render(&source.table, map, &plan)),
            Err(problems) => {
                return Err(MigrateError::Mapping {
                    source_name: source.name.clone(),
                    database: source.database_display.clone(),
                    problems: forward::describe(&problems),
                });
            }
        },
    };
    if concurrently {
        build_concurrently(&client, source, lock_timeout).await?;
    }
    let result = async {
        let tx = client.transaction().await?;
        // "already exists, skipping" notices are the expected case on a re-run.
        // Every statement waits at most `lock_timeout` for a lock: DDL on the
        // table waits behind open transactions, and producers' inserts queue
        // behind the waiting DDL, so an unbounded wait would stall them all.
        tx.batch_execute(&format!(
            "SET LOCAL client_min_messages = warning; SET LOCAL {}",
            lock_timeout_setting(lock_timeout)
        ))
        .await?;
        tx.batch_execute(&render(source)).await?;
        if let Some(forward) = &forward {
            tx.batch_execute(forward).await?;
        }
        if let Some(wal) = &wal {
            tx.batch_execute(&wal.0).await?;
        }
        tx.commit().await
    }
    .await
    .map_err(sql_error);
    result?;
    if let (Some((_, slot_sql)), Some(w)) = (&wal, source.capture.wal()) {
        client
            .batch_execute(&format!(
                "SET statement_timeout = '{SLOT_TIMEOUT}'; {slot_sql}; RESET statement_timeout"
            ))
            .await
            .map_err(|e| MigrateError::Slot {
                source_name: source.name.clone(),
                database: source.database_display.clone(),
                slot: w.slot.clone(),
                source: e,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;

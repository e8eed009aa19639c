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

use tracing::info;

use crate::config::{Config, SourceConfig, WalCapture};
use crate::forward;
use crate::ident::{quote_ident, quote_literal};
use crate::source::ConnectError;

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
        ("claim_index", t.derived("_claim_idx")),
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

pub async fn run(config: &Config) -> Result<(), MigrateError> {
    for source in &config.sources {
        migrate_one(source).await?;
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

async fn migrate_one(source: &SourceConfig) -> Result<(), MigrateError> {
    let mut client = crate::source::connect(source)
        .await
        .map_err(|e| MigrateError::Connect {
            source_name: source.name.clone(),
            database: source.database_display.clone(),
            source: e,
        })?;
    let wal = source.capture.wal().map(|w| render_wal(source, w));
    let sql_error = |e| MigrateError::Sql {
        source_name: source.name.clone(),
        database: source.database_display.clone(),
        source: e,
    };
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
    let result = async {
        let tx = client.transaction().await?;
        // "already exists, skipping" notices are the expected case on a re-run.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
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
mod tests {
    use super::*;

    fn source(table: &str, channel: Option<&str>) -> SourceConfig {
        let mut text = format!(
            "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"s\"\ndatabase_url = \"postgres://u@h/db\"\ntable = \"{table}\"\n"
        );
        if let Some(c) = channel {
            text.push_str(&format!("notify_channel = \"{c}\"\n"));
        }
        let config = Config::from_toml(&text, &|_| None).unwrap();
        config.sources.into_iter().next().unwrap()
    }

    #[test]
    fn the_wal_script_splits_at_the_slot_and_fills_its_names() {
        let text = "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"Orders\"\n\
                    database_url = \"postgres://u@h/db\"\ncapture = \"wal\"\n";
        let config = Config::from_toml(text, &|_| None).unwrap();
        let source = &config.sources[0];
        let wal = source.capture.wal().expect("a wal source");
        let (body, slot) = render_wal(source, wal);
        assert!(!body.contains(":'") && !slot.contains(":'"), "{body}{slot}");
        assert!(body.contains("'outboxd_orders'"), "{body}");
        assert!(
            !body.contains("pg_create_logical_replication_slot"),
            "{body}"
        );
        assert!(
            slot.contains("pg_create_logical_replication_slot('outboxd_orders', 'pgoutput')"),
            "{slot}"
        );
    }

    #[test]
    fn fills_every_placeholder() {
        let sql = render(&source("billing.events", None));
        assert!(!sql.contains(":\""), "{sql}");
        assert!(!sql.contains(":'"), "{sql}");
        assert!(!sql.contains("\\if"), "{sql}");
        assert!(
            sql.contains(r#"CREATE TABLE IF NOT EXISTS "billing"."events" ("#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"CREATE INDEX IF NOT EXISTS "events_claim_idx""#),
            "{sql}"
        );
        // the index of earlier versions goes
        assert!(
            sql.contains(r#"DROP INDEX IF EXISTS "billing"."events_pending_idx""#),
            "{sql}"
        );
        assert!(
            sql.contains("set_config('outboxd.notify_function', 'events_notify_fn', false)"),
            "{sql}"
        );
        assert!(
            sql.contains("set_config('outboxd.channel', 'outboxd.billing.events', false)"),
            "{sql}"
        );
        assert!(
            sql.contains(r#"CREATE TABLE IF NOT EXISTS "billing"."events_wakeup""#),
            "{sql}"
        );
        // `::text` casts are not mistaken for placeholders
        assert!(sql.contains("gen_random_uuid()::text"), "{sql}");
    }

    #[test]
    fn quotes_the_channel_as_a_literal() {
        let sql = render(&source("outbox", Some("it's")));
        assert!(
            sql.contains("set_config('outboxd.channel', 'it''s', false)"),
            "{sql}"
        );
    }
}

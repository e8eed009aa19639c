//! `outboxd migrate`: create the outbox table, its indexes and its NOTIFY
//! trigger in every source database, from `sql/outbox.sql`.
//!
//! The same file works with psql by hand. psql fills in its `:"var"`
//! placeholders; here we do the same substitution ourselves, with names
//! from the config that were validated at load and are quoted again here.

use tracing::info;

use crate::config::{Config, SourceConfig};
use crate::ident::{quote_ident, quote_literal};
use crate::source::ConnectError;

const SQL: &str = include_str!("../sql/outbox.sql");

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
    let t = &source.table;
    let vars = [
        ("schema", t.schema.clone()),
        ("table", t.table.clone()),
        ("pending_index", t.derived("_pending_idx")),
        ("claim_index", t.derived("_claim_idx")),
        ("aggregate_index", t.derived("_aggregate_idx")),
        ("held_index", t.derived("_held_idx")),
        ("waiting_index", t.derived("_waiting_idx")),
        ("dead_aggregate_index", t.derived("_dead_aggregate_idx")),
        ("published_index", t.derived("_published_idx")),
        ("notify_trigger", t.derived("_notify")),
        ("notify_function", t.derived("_notify_fn")),
        ("wakeup_table", t.derived("_wakeup")),
        ("dead_table", t.derived("_dead")),
        ("channel", source.notify_channel.clone()),
    ];
    let mut out = String::with_capacity(SQL.len());
    for line in SQL.lines() {
        // psql meta-commands (\if, \set) only compute the defaults we fill in here.
        if line.starts_with('\\') {
            continue;
        }
        let mut line = line.to_owned();
        for (name, value) in &vars {
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
    let result = async {
        let tx = client.transaction().await?;
        // "already exists, skipping" notices are the expected case on a re-run.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await?;
        tx.batch_execute(&render(source)).await?;
        tx.commit().await
    }
    .await
    .map_err(|e| MigrateError::Sql {
        source_name: source.name.clone(),
        database: source.database_display.clone(),
        source: e,
    });
    drop(client);
    result
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

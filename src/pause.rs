//! `outboxd pause --source S` / `outboxd resume --source S`: set or clear
//! the `paused` column of the source's wake-up flag table, and NOTIFY the
//! source's channel so the relays listening there hear it at once.
//!
//! The flag is the table's, not one process's: every relay on the table
//! honours it (`source/pause.rs`), and it outlives restarts. Pausing also
//! disarms the wake-up flag, so producers send no NOTIFY while nothing
//! would claim their rows. Both are idempotent: a second pause changes
//! nothing and says so.

use crate::config::{Config, SourceConfig};
use crate::source::command::{SourceCommandError, connect, db_error, find};
use crate::source::pause::{PAUSE_PAYLOAD, RESUME_PAYLOAD, predates_pause};

/// Pauses (`paused = true`) or resumes the source named `name`; returns
/// what to print.
pub async fn set(config: &Config, name: &str, paused: bool) -> Result<String, SourceCommandError> {
    let source = find(config, name)?;
    let mut client = connect(source).await?;
    let flag = source.table.sibling("_wakeup");
    let result: Result<Option<(bool, Option<String>)>, tokio_postgres::Error> = async {
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT paused, to_json(paused_at) #>> '{{}}' FROM {flag} LIMIT 1 FOR UPDATE"
                ),
                &[],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (was, since): (bool, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
        if was == paused {
            return Ok(Some((false, since)));
        }
        // Pausing disarms the producers' flag: nothing would claim what
        // their NOTIFY announces. A resumed relay sets it again itself.
        let since: Option<String> = tx
            .query_one(
                &format!(
                    "UPDATE {flag} SET paused = $1, paused_at = CASE WHEN $1 THEN now() END, \
                         armed = armed AND NOT $1 \
                     RETURNING to_json(paused_at) #>> '{{}}'"
                ),
                &[&paused],
            )
            .await?
            .try_get(0)?;
        let payload = if paused {
            PAUSE_PAYLOAD
        } else {
            RESUME_PAYLOAD
        };
        // Delivered at commit, to every relay listening on the channel.
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&source.notify_channel, &payload],
        )
        .await?;
        tx.commit().await?;
        Ok(Some((true, since)))
    }
    .await;
    match result {
        Ok(Some((changed, since))) => Ok(describe(source, paused, changed, since.as_deref())),
        Ok(None) => Err(not_migrated(source, flag)),
        Err(e) if predates_pause(&e) => Err(not_migrated(source, flag)),
        Err(e) => Err(db_error(source)(e)),
    }
}

fn not_migrated(source: &SourceConfig, flag: String) -> SourceCommandError {
    SourceCommandError::Refused(format!(
        "source {:?} ({}): {flag} has no pause flag (made by an earlier version, or missing); \
         run `outboxd migrate`, which adds it",
        source.name, source.database_display
    ))
}

/// The line the command prints.
fn describe(source: &SourceConfig, paused: bool, changed: bool, since: Option<&str>) -> String {
    let what = format!("source {:?} (table {})", source.name, source.table);
    let when = source.poll_interval;
    match (paused, changed) {
        (true, true) => format!(
            "paused {what}: its relays stop claiming within {when:?} (batches in flight finish); \
             new rows wait in the outbox until `outboxd resume`"
        ),
        (true, false) => format!(
            "{what} was already paused (since {}); nothing changed",
            since.unwrap_or("an unknown time")
        ),
        (false, true) if source.capture.wal().is_some() => {
            format!("resumed {what}: its relay streams again within {when:?}, from the slot")
        }
        (false, true) => format!("resumed {what}: its relays claim again now"),
        (false, false) => format!("{what} was not paused; nothing changed"),
    }
}

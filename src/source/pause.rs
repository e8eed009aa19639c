//! The relay's side of `outboxd pause` / `resume`: the `paused` column of
//! the wake-up flag table (`sql/outbox.sql`), read by every relay on the
//! table, and the `NOTIFY` the commands send on the source's channel.
//!
//! - **Polling sources**: the listener (`wakeup.rs`) reads the flag when it
//!   starts listening and once per poll interval on its own connection, and
//!   takes a pause or resume notification at once. The server delivers a
//!   notification after the answers to queries that came before it, so a
//!   periodic read never undoes a newer notification. While the listener
//!   is down the relay keeps the state it last read.
//! - **`capture = "wal"` sources** have no listener: [`watch`] reads the flag
//!   once per poll interval on a pooled connection.
//!
//! A table migrated before pause existed has no such column: its source
//! counts as not paused (`outboxd pause` says to run `outboxd migrate`).

use std::time::Duration;

use deadpool_postgres::Pool;
use prometheus::IntGauge;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{SourceHealth, step};
use crate::ident::TableName;
use crate::telemetry::ErrorChain;

/// The notification payload of `outboxd pause`.
pub const PAUSE_PAYLOAD: &str = "outboxd pause";
/// The notification payload of `outboxd resume`.
pub const RESUME_PAYLOAD: &str = "outboxd resume";

/// Reads the flag: one row, `paused`.
pub fn read_sql(table: &TableName) -> String {
    format!("SELECT paused FROM {} LIMIT 1", table.sibling("_wakeup"))
}

/// What a notification on the source's channel says about the pause:
/// `Some(true)` pause, `Some(false)` resume, `None` a producer's wake-up.
pub fn from_payload(payload: &str) -> Option<bool> {
    match payload {
        PAUSE_PAYLOAD => Some(true),
        RESUME_PAYLOAD => Some(false),
        _ => None,
    }
}

/// The flag from one run of [`read_sql`]: a table without the column (or
/// without the flag table, or its row) is not paused.
pub fn decode(result: Result<Option<Row>, tokio_postgres::Error>) -> Result<bool, String> {
    match result {
        Ok(Some(row)) => row
            .try_get::<_, bool>(0)
            .map_err(|e| ErrorChain(&e).to_string()),
        Ok(None) => Ok(false),
        Err(e) if predates_pause(&e) => Ok(false),
        Err(e) => Err(ErrorChain(&e).to_string()),
    }
}

/// The error says the flag table has no `paused` column (or is missing):
/// it was made before pause existed, or dropped.
pub fn predates_pause(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::UNDEFINED_COLUMN | &SqlState::UNDEFINED_TABLE)
    )
}

/// Records the flag for the relay loop, `/readyz` and
/// `outboxd_source_paused`, and logs each change once.
pub fn apply(name: &str, health: &SourceHealth, gauge: &IntGauge, paused: bool) {
    gauge.set(i64::from(paused));
    let was = health.set_paused(paused);
    if was != paused {
        if paused {
            info!(source = %name, "source paused by an operator (`outboxd pause`): no new claims, batches in flight finish, rows wait in the outbox");
        } else {
            info!(source = %name, "source resumed (`outboxd resume`): claiming again");
        }
    }
}

/// How long a relay waits at start for its first read of the flag.
pub const FIRST_READ: Duration = Duration::from_secs(5);

/// One read of the flag on a pooled connection.
pub async fn read(pool: &Pool, sql: &str, within: Duration) -> Result<bool, String> {
    let client = step("take a connection", pool.get())
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    match tokio::time::timeout(within, client.query_opt(sql, &[])).await {
        Ok(result) => decode(result),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// Before a relay's first claim: a source that is paused when its relay
/// starts must not send a batch before the listener (or [`watch`]) has
/// read the flag. A database that does not answer leaves the source
/// unpaused: the relay cannot claim then either, and the listener reads
/// the flag as soon as it connects.
pub async fn first_read(
    pool: &Pool,
    table: &TableName,
    name: &str,
    health: &SourceHealth,
    gauge: &IntGauge,
) {
    let within = FIRST_READ;
    match tokio::time::timeout(within, read(pool, &read_sql(table), within)).await {
        Ok(Ok(paused)) => apply(name, health, gauge, paused),
        Ok(Err(error)) => {
            debug!(source = %name, %error, "cannot read the pause flag at start; the listener reads it once connected")
        }
        Err(_) => {
            debug!(source = %name, "no answer reading the pause flag at start; the listener reads it once connected")
        }
    }
}

/// `capture = "wal"`: reads the flag every `every` until `stop`. A failed
/// read keeps the last state (the relay reports the database itself).
pub async fn watch(
    pool: Pool,
    table: TableName,
    name: String,
    health: std::sync::Arc<SourceHealth>,
    gauge: IntGauge,
    every: Duration,
    stop: CancellationToken,
) {
    let sql = read_sql(&table);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match read(&pool, &sql, super::DB_TIMEOUT).await {
            Ok(paused) => apply(&name, &health, &gauge, paused),
            Err(error) => {
                debug!(source = %name, %error, "reading the pause flag failed; keeping the last state")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_commands_payloads_pause_or_resume() {
        // the commands' own payloads
        assert_eq!(from_payload(PAUSE_PAYLOAD), Some(true));
        assert_eq!(from_payload(RESUME_PAYLOAD), Some(false));
        // the producers' trigger sends an empty payload: a wake-up
        assert_eq!(from_payload(""), None);
        // anything else someone NOTIFYs on the channel is a wake-up too
        assert_eq!(from_payload("outboxd pause "), None);
        assert_eq!(from_payload("pause"), None);
    }

    #[test]
    fn the_read_names_the_flag_table() {
        let table = TableName::parse("billing.events").unwrap();
        assert_eq!(
            read_sql(&table),
            r#"SELECT paused FROM "billing"."events_wakeup" LIMIT 1"#
        );
    }
}

//! `outboxd slot drop`: drop a `capture = "wal"` source's replication slot
//! (after a lost slot, or when the source goes back to polling). Without
//! `--yes` it only says what it would drop and how much WAL that frees.

use crate::config::Config;
use crate::source::command::{SourceCommandError, connect, db_error, find};

/// Drops the slot of `source` (with `yes`), or describes it. Returns what
/// to print.
pub async fn drop_slot(
    config: &Config,
    source: &str,
    yes: bool,
) -> Result<String, SourceCommandError> {
    let cfg = find(config, source)?;
    let wal = cfg.capture.wal().ok_or_else(|| {
        SourceCommandError::Refused(format!(
            "source {source:?} does not use capture = \"wal\"; it has no slot"
        ))
    })?;
    let client = connect(cfg).await?;
    let row = client
        .query_opt(
            "SELECT active_pid, pg_size_pretty((pg_current_wal_lsn() - restart_lsn)::bigint), wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&wal.slot],
        )
        .await
        .map_err(db_error(cfg))?;
    let Some(row) = row else {
        return Err(SourceCommandError::Refused(format!(
            "slot {:?} of source {source:?} does not exist; nothing to drop",
            wal.slot
        )));
    };
    let active: Option<i32> = row.get(0);
    let retained: Option<String> = row.get(1);
    let status: Option<String> = row.get(2);
    let describe = format!(
        "slot {:?} of source {source:?} ({}), {}, keeps {} of WAL",
        wal.slot,
        cfg.database_display,
        status.unwrap_or_else(|| "unknown state".into()),
        retained.unwrap_or_else(|| "no".into())
    );
    if let Some(pid) = active {
        return Err(SourceCommandError::Refused(format!(
            "{describe}; it is in use by the session of pid {pid}: stop the relays of this source first"
        )));
    }
    if !yes {
        return Err(SourceCommandError::Refused(format!(
            "would drop {describe}. Rows still in the outbox table are sent again by the next run \
             (from the table, before the new slot's stream); outbox_emit() messages not yet sent are \
             lost with it. Run again with --yes to drop it, then `outboxd migrate` to make a new one."
        )));
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&wal.slot])
        .await
        .map_err(db_error(cfg))?;
    Ok(format!("dropped {describe}"))
}

//! Whether the forwarding trigger in the database is the one this config
//! would make. `check` reports it as a line; `run` reads it once at start
//! and warns, so a mapping changed without running `migrate` again (the
//! old trigger keeps forwarding under the old mapping) is said where the
//! operator looks.

use deadpool_postgres::Pool;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Plan, describe, read_plan, trigger};
use crate::config::{ColumnMap, SourceConfig};
use crate::ident::TableName;
use crate::source::step;
use crate::telemetry::ErrorChain;

/// The forwarding trigger as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerState {
    /// There, enabled, and made for this mapping.
    Current,
    /// Not there: producers' rows are not relayed.
    Missing,
    /// There but disabled: producers' rows are not relayed.
    Disabled,
    /// Made for another mapping (or another outboxd version).
    Stale,
}

impl TriggerState {
    /// What is wrong and what to do, or `None` when it is current.
    pub fn problem(&self, map: &ColumnMap) -> Option<String> {
        let name = trigger::trigger_name(map);
        match self {
            TriggerState::Current => None,
            TriggerState::Missing => Some(format!(
                "no trigger {name} on {}: producers' rows are not relayed; run `outboxd migrate`",
                map.table
            )),
            TriggerState::Disabled => Some(format!(
                "trigger {name} on {} is disabled: producers' rows are not relayed; ALTER TABLE … ENABLE TRIGGER {name}",
                map.table
            )),
            TriggerState::Stale => Some(format!(
                "trigger {name} on {} was made for another column mapping (or another outboxd version); run `outboxd migrate`",
                map.table
            )),
        }
    }
}

/// Reads the trigger on the producers' table and compares its function
/// with the one `plan` makes.
pub async fn read(
    client: &Client,
    relay: &TableName,
    map: &ColumnMap,
    plan: &Plan,
) -> Result<TriggerState, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT t.tgenabled::text, p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = to_regclass($1::text) AND t.tgname = $2",
            &[&map.table.quoted(), &trigger::trigger_name(map)],
        )
        .await?;
    Ok(match row {
        None => TriggerState::Missing,
        Some(row) if row.get::<_, String>(0) == "D" => TriggerState::Disabled,
        Some(row) if row.get::<_, String>(1) != trigger::body(relay, map, plan) => {
            TriggerState::Stale
        }
        Some(_) => TriggerState::Current,
    })
}

/// `run`'s one look at a mapped source's trigger, once its database
/// answers: a WARN naming the problem, or an INFO that it is in place.
/// A database that does not answer is the relay loop's to report; this
/// gives up quietly then (`check` covers it).
pub async fn at_start(pool: Pool, source: SourceConfig, stop: CancellationToken) {
    let Some(map) = &source.mapping else {
        return;
    };
    let name = &source.name;
    let look = async {
        let client = step("take a connection", pool.get()).await?;
        let plan = step("read the producers' columns", read_plan(&client, map)).await?;
        let plan = match plan {
            Ok(plan) => plan,
            Err(problems) => return Ok(Err(describe(&problems))),
        };
        let state = step(
            "read the forwarding trigger",
            read(&client, &source.table, map, &plan),
        )
        .await?;
        Ok::<_, crate::source::DbError>(Ok(state))
    };
    let result = tokio::select! {
        _ = stop.cancelled() => return,
        r = look => r,
    };
    match result {
        Ok(Ok(TriggerState::Current)) => {
            info!(source = %name, table = %map.table, "forwarding trigger in place for this column mapping");
        }
        Ok(Ok(state)) => {
            if let Some(problem) = state.problem(map) {
                warn!(source = %name, "{problem}");
            }
        }
        Ok(Err(problems)) => {
            warn!(source = %name, table = %map.table, %problems, "the column mapping does not fit the producers' table; fix [source.columns] or the table, then run `outboxd migrate`");
        }
        Err(err) => {
            debug!(source = %name, error = %ErrorChain(&err), "could not look at the forwarding trigger at start; `outboxd check` reports it");
        }
    }
}

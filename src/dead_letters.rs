//! `outboxd dead-letters list | replay | purge`: what operators do with
//! parked rows. Replay moves rows back into the outbox with their id and
//! dedup key unchanged and their attempts reset, so consumers that already
//! saw a message (it may have been delivered before a failure) drop the
//! duplicate by its message id.

use std::io::Write;

use crate::config::{Config, OnPark, SourceConfig};
use crate::source::command::{SourceCommandError, connect, db_error, find};

/// Which rows an action applies to.
pub enum Selection {
    Ids(Vec<i64>),
    All,
}

fn dead_table(source: &SourceConfig) -> String {
    source.table.sibling("_dead")
}

/// Prints the parked rows of one source (or all), oldest id first.
pub async fn list<W: Write>(
    config: &Config,
    only: Option<&str>,
    limit: i64,
    mut out: W,
) -> Result<(), SourceCommandError> {
    let sources: Vec<&SourceConfig> = match only {
        Some(name) => vec![find(config, name)?],
        None => config.sources.iter().collect(),
    };
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:<24} {:>8} {:<20} {:<18} LAST ERROR",
        "SOURCE", "ID", "EVENT TYPE", "ATTEMPTS", "PARKED AT (UTC)", "REASON"
    );
    for source in sources {
        let client = connect(source).await?;
        let sql = format!(
            "SELECT id, event_type, attempts, to_char(parked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
                    reason, last_error, (SELECT count(*) FROM {t}) \
             FROM {t} ORDER BY id LIMIT $1",
            t = dead_table(source)
        );
        let rows = client
            .query(&sql, &[&limit])
            .await
            .map_err(db_error(source))?;
        for r in &rows {
            let error: String = r.get(5);
            let _ = writeln!(
                out,
                "{:<16} {:>10} {:<24} {:>8} {:<20} {:<18} {}",
                source.name,
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, i32>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                error.replace('\n', " ")
            );
        }
        let total: i64 = rows.first().map(|r| r.get(6)).unwrap_or(0);
        if total > rows.len() as i64 {
            let _ = writeln!(
                out,
                "({} of {total} shown for source {}; use --limit)",
                rows.len(),
                source.name
            );
        }
    }
    Ok(())
}

/// Moves parked rows back into the outbox; returns the ids replayed.
/// What a replay moved back, and which of the ids asked for were not
/// parked (an error, once the others are back in the outbox).
#[derive(Debug)]
pub struct Replayed {
    pub done: Vec<i64>,
    pub missing: Vec<i64>,
}

impl Replayed {
    /// `Err` naming the ids that were asked for but not parked.
    pub fn complete(&self, source: &str) -> Result<(), SourceCommandError> {
        if self.missing.is_empty() {
            return Ok(());
        }
        Err(SourceCommandError::Refused(format!(
            "no dead letter with id {:?} in source {source:?}",
            self.missing
        )))
    }
}

pub async fn replay(
    config: &Config,
    source: &str,
    which: &Selection,
) -> Result<Replayed, SourceCommandError> {
    let source = find(config, source)?;
    let client = connect(source).await?;
    let (filter, ids) = selection(which);
    let sql = format!(
        "WITH moved AS (DELETE FROM {dead} WHERE {filter} RETURNING *) \
         INSERT INTO {outbox} (id, aggregate_type, aggregate_id, event_type, payload, headers, dedup_key, \
             exchange, routing_key, created_at, attempts, available_at, last_error, published_at) \
         SELECT id, aggregate_type, aggregate_id, event_type, payload, headers, dedup_key, \
             exchange, routing_key, created_at, 0, now(), NULL, NULL FROM moved \
         RETURNING id",
        dead = dead_table(source),
        outbox = source.table.quoted()
    );
    let rows = client
        .query(&sql, &[&ids])
        .await
        .map_err(db_error(source))?;
    let mut done: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    done.sort_unstable();
    let missing = match which {
        Selection::Ids(ids) => ids
            .iter()
            .copied()
            .filter(|id| !done.contains(id))
            .collect(),
        Selection::All => Vec::new(),
    };
    Ok(Replayed { done, missing })
}

/// Deletes parked rows; without `yes`, only says how many it would delete.
pub async fn purge(
    config: &Config,
    source: &str,
    which: &Selection,
    yes: bool,
) -> Result<u64, SourceCommandError> {
    let source = find(config, source)?;
    let client = connect(source).await?;
    let (filter, ids) = selection(which);
    let dead = dead_table(source);
    if !yes {
        let n: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {dead} WHERE {filter}"),
                &[&ids],
            )
            .await
            .map_err(db_error(source))?
            .get(0);
        return Err(SourceCommandError::Refused(format!(
            "this would delete {n} dead letter(s) of source {:?} for good; re-run with --yes",
            source.name
        )));
    }
    let purged = client
        .execute(&format!("DELETE FROM {dead} WHERE {filter}"), &[&ids])
        .await
        .map_err(db_error(source))?;
    // With on_park = "hold", the later rows of those aggregates waited for
    // the purged rows: release them now rather than at the relay's next sweep.
    if source.ordering.ordered() && source.on_park == OnPark::Hold {
        let sweep = crate::source::order::Sql::new(source).sweep;
        client
            .execute(&sweep, &[])
            .await
            .map_err(db_error(source))?;
    }
    Ok(purged)
}

/// The WHERE clause and its one parameter (unused for `All`, but always bound).
fn selection(which: &Selection) -> (&'static str, Vec<i64>) {
    match which {
        Selection::Ids(ids) => ("id = ANY($1)", ids.clone()),
        Selection::All => ("$1::bigint[] IS NOT NULL", Vec::new()),
    }
}

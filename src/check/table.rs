//! `outboxd check`, one source's table: its columns and their types, the
//! relay's privileges, the partition index of an ordered source, and the
//! NOTIFY trigger (or, for `capture = "wal"`, that none is needed).

use std::io::Write;

use tokio_postgres::Client;

use super::{COLUMNS, Level, Report};
use crate::config::{Ordering, SourceConfig};
use crate::ident::quote_literal;

pub(super) async fn check<W: Write>(
    r: &mut Report<W>,
    client: &Client,
    source: &SourceConfig,
) -> Result<(), tokio_postgres::Error> {
    let what = |part: &str| format!("source {} {part}", source.name);
    let t = &source.table;
    let rows = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2",
            &[&t.schema, &t.table],
        )
        .await?;
    if rows.is_empty() {
        r.line(
            Level::Fail,
            &what("table"),
            &format!("{t} does not exist (or is not visible to this role); run `outboxd migrate`"),
        );
        return Ok(());
    }
    let found: Vec<(String, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let mut problems = Vec::new();
    for (name, ty) in COLUMNS {
        match found.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("column {name} is missing")),
            Some((_, actual)) if actual != ty => {
                problems.push(format!("column {name} is {actual}, expected {ty}"))
            }
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        r.line(
            Level::Ok,
            &what("table"),
            &format!("{t} has all {} columns", COLUMNS.len()),
        );
    } else {
        r.line(
            Level::Fail,
            &what("table"),
            &format!("{t}: {}", problems.join("; ")),
        );
    }

    // DELETE even in mark mode: parking moves a row out of the outbox.
    let dead = t.sibling("_dead");
    let needed = [
        (t.quoted(), "SELECT"),
        (t.quoted(), "UPDATE"),
        (t.quoted(), "DELETE"),
        (dead.clone(), "SELECT"),
        (dead.clone(), "INSERT"),
    ];
    let mut missing = Vec::new();
    for (table, privilege) in &needed {
        let row = client
            .query_one(
                "SELECT to_regclass($1::text) IS NOT NULL AND has_table_privilege($1::text, $2::text)",
                &[table, privilege],
            )
            .await?;
        if !row.get::<_, bool>(0) {
            missing.push(format!("{privilege} on {table}"));
        }
    }
    if missing.is_empty() {
        r.line(
            Level::Ok,
            &what("privileges"),
            &format!("current role may SELECT, UPDATE, DELETE on {t} and SELECT, INSERT on {dead}"),
        );
    } else {
        r.line(
            Level::Fail,
            &what("privileges"),
            &format!(
                "current role lacks {} (or the table is missing; run `outboxd migrate`); see README \"Least privilege\"",
                missing.join(", ")
            ),
        );
    }

    if source.capture.wal().is_none() && source.ordering != Ordering::None {
        check_ordered_indexes(r, client, source).await?;
    }

    if source.capture.wal().is_some() {
        r.line(
            Level::Ok,
            &what("trigger"),
            "not needed with capture = \"wal\" (the log wakes the relay; migrate removes it)",
        );
        return Ok(());
    }
    // The trigger function migrate creates has the channel built in.
    let bodies = client
        .query(
            "SELECT p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = to_regclass($1::text) AND NOT t.tgisinternal",
            &[&t.quoted()],
        )
        .await?;
    let channel = quote_literal(&source.notify_channel);
    let notifies = bodies
        .iter()
        .any(|row| row.get::<_, String>(0).contains(&channel));
    let wakeup = t.sibling("_wakeup");
    let flag = client
        .query_one(
            "SELECT to_regclass($1::text) IS NOT NULL AND has_table_privilege($1::text, 'UPDATE')",
            &[&wakeup],
        )
        .await?
        .get::<_, bool>(0);
    if notifies && flag {
        r.line(
            Level::Ok,
            &what("trigger"),
            &format!(
                "inserts notify channel {:?} when the relay is idle",
                source.notify_channel
            ),
        );
    } else if notifies {
        r.line(
            Level::Warn,
            &what("trigger"),
            &format!(
                "cannot update the wake-up flag {wakeup} (missing, or no UPDATE privilege); rows are found by polling every {:?} only",
                source.poll_interval
            ),
        );
    } else {
        r.line(
            Level::Warn,
            &what("trigger"),
            &format!(
                "no trigger notifies channel {:?}; rows are found by polling every {:?} only (run `outboxd migrate`)",
                source.notify_channel, source.poll_interval
            ),
        );
    }
    Ok(())
}

/// Ordered claims look up the oldest row of each free partition on the
/// partition index, and walk the claim index within their partitions'
/// range; the relay works without them, more slowly.
async fn check_ordered_indexes<W: Write>(
    r: &mut Report<W>,
    client: &Client,
    source: &SourceConfig,
) -> Result<(), tokio_postgres::Error> {
    for found in crate::source::order::ordered_indexes(client, &source.table).await? {
        let what = format!("source {} {}", source.name, found.label);
        match found.problem() {
            None => r.line(
                Level::Ok,
                &what,
                &format!("{} is there for ordered claims", found.index),
            ),
            Some(problem) => r.line(Level::Warn, &what, &format!("{} {problem}", found.index)),
        }
    }
    Ok(())
}

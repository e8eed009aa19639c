//! `check` for a mapped table (`layout = "debezium"`, `[source.columns]`):
//! every mapped column exists with a type the trigger can read, and the
//! forwarding trigger is there, enabled, and made for this mapping.

use std::io::Write;

use tokio_postgres::Client;

use super::{Level, Report};
use crate::config::{ColumnMap, SourceConfig};
use crate::forward::{self, trigger};

pub(super) async fn check<W: Write>(
    r: &mut Report<W>,
    client: &Client,
    source: &SourceConfig,
    map: &ColumnMap,
) -> Result<(), tokio_postgres::Error> {
    let what = |part: &str| format!("source {} {part}", source.name);
    let columns = forward::columns(client, map).await?;
    let plan = match forward::plan(map, columns.as_deref()) {
        Ok(plan) => plan,
        Err(problems) => {
            for p in problems {
                r.line(Level::Fail, &what("columns"), &p.to_string());
            }
            return Ok(());
        }
    };
    let columns = columns.unwrap_or_default();
    let type_of = |name: &str| {
        columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.type_name.clone())
            .unwrap_or_default()
    };
    let mut mapped: Vec<String> = map
        .keyed()
        .iter()
        .map(|(key, column)| format!("{key} = {column} ({})", type_of(column)))
        .collect();
    if !map.header_columns.is_empty() {
        mapped.push(format!("headers from {}", map.header_columns.join(", ")));
    }
    r.line(
        Level::Ok,
        &what("columns"),
        &format!("{}: {}", map.table, mapped.join(", ")),
    );

    let name = trigger::trigger_name(map);
    let row = client
        .query_opt(
            "SELECT t.tgenabled::text, p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = to_regclass($1::text) AND t.tgname = $2",
            &[&map.table.quoted(), &name],
        )
        .await?;
    let (level, detail) = match row {
        None => (
            Level::Fail,
            format!(
                "no trigger {name} on {}: producers' rows are not relayed; run `outboxd migrate`",
                map.table
            ),
        ),
        Some(row) if row.get::<_, String>(0) == "D" => (
            Level::Fail,
            format!(
                "trigger {name} on {} is disabled: producers' rows are not relayed; ALTER TABLE … ENABLE TRIGGER {name}",
                map.table
            ),
        ),
        Some(row) if row.get::<_, String>(1) != trigger::body(&source.table, map, &plan) => (
            Level::Fail,
            format!(
                "trigger {name} on {} was made for another column mapping (or another outboxd version); run `outboxd migrate`",
                map.table
            ),
        ),
        Some(_) => (
            Level::Ok,
            format!(
                "trigger {name} forwards each insert into {} to {}",
                map.table, source.table
            ),
        ),
    };
    r.line(level, &what("forwarding"), &detail);
    Ok(())
}

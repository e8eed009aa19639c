//! `check` for a mapped table (`layout = "debezium"`, `[source.columns]`):
//! every mapped column exists with a type the trigger can read, and the
//! forwarding trigger is there, enabled, and made for this mapping.

use std::io::Write;

use tokio_postgres::Client;

use super::{Level, Report};
use crate::config::{ColumnMap, SourceConfig};
use crate::forward::{self, state, trigger};

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

    let state = state::read(client, &source.table, map, &plan).await?;
    let (level, detail) = match state.problem(map) {
        Some(problem) => (Level::Fail, problem),
        None => (
            Level::Ok,
            format!(
                "trigger {} forwards each insert into {} to {}",
                trigger::trigger_name(map),
                map.table,
                source.table
            ),
        ),
    };
    r.line(level, &what("forwarding"), &detail);
    Ok(())
}

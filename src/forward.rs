//! A mapped table (`layout = "debezium"`, `[source.columns]`): producers
//! insert into a table of their own layout, and a trigger forwards each
//! row, in the producer's transaction, into the relay's own table beside it.
//!
//! ```text
//! producer: INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
//!   └─ AFTER INSERT trigger (forward/trigger.rs)
//!        INSERT INTO outboxevent_outboxd (aggregate_type, …, dedup_key = id::text)
//! relay:    claims, publishes and deletes rows of outboxevent_outboxd as usual
//! ```
//!
//! Why a trigger and not outboxd's bookkeeping columns added to the
//! producers' table: Debezium's producers often delete their row right
//! after inserting it (Debezium reads the insert from the log), which a
//! relay claiming from that table would never see; the relay's claim,
//! ordering, dead letters and log reading all stay as they are; and the
//! producers' table is not rewritten. The producers' rows are left as they
//! are: outboxd never reads, changes or deletes them.
//!
//! Here: reading the producers' columns from the catalog and checking
//! them against the mapping (shared by `migrate`, which refuses to write a
//! trigger that would fail producers' inserts, and by `check`).

pub mod state;
pub mod trigger;

use tokio_postgres::Client;

use crate::config::ColumnMap;

/// One column of the producers' table, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// As `format_type` prints it: `character varying(255)`.
    pub type_name: String,
    /// The type's (or its domain's base type's) `typname`: `varchar`.
    pub base: String,
    /// `pg_type.typcategory` of the base type: `S` string, `N` numeric, …
    pub category: char,
}

/// How the trigger turns the payload column into the relay's jsonb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// jsonb: taken as it is.
    Json,
    /// text, varchar or json: JSON text is sent as that JSON; any other text is
    /// sent as a JSON string (never a failed insert, never a bad row).
    Text,
}

/// How a header column's value becomes a header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderKind {
    /// A number or a boolean stays one.
    Scalar,
    /// Anything else is sent as its text.
    Text,
}

/// What the trigger needs to know of the columns' types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub payload: PayloadKind,
    pub header_columns: Vec<(String, HeaderKind)>,
}

/// Why a mapping does not fit the producers' table; each names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingProblem {
    #[error("table {table} does not exist (or is not visible to this role)")]
    NoTable { table: String },
    #[error("columns.{key} = {column:?}: {table} has no such column")]
    Missing {
        key: String,
        column: String,
        table: String,
    },
    #[error("columns.{key} = {column:?} is {found}; it must be {wanted}")]
    Type {
        key: String,
        column: String,
        found: String,
        wanted: &'static str,
    },
}

const TEXT_LIKE: &str = "text, varchar, char, uuid, an integer or an enum";
const PAYLOAD_LIKE: &str = "jsonb, json, text or varchar";

/// Checks the mapping against the producers' columns (`None`: no table).
pub fn plan(map: &ColumnMap, columns: Option<&[Column]>) -> Result<Plan, Vec<MappingProblem>> {
    let table = map.table.to_string();
    let Some(columns) = columns else {
        return Err(vec![MappingProblem::NoTable { table }]);
    };
    let mut problems = Vec::new();
    let mut find = |key: &str, name: &str| {
        let found = columns.iter().find(|c| c.name == name);
        if found.is_none() {
            problems.push(MappingProblem::Missing {
                key: key.to_owned(),
                column: name.to_owned(),
                table: table.clone(),
            });
        }
        found
    };
    let mut typed = Vec::new();
    for (key, name) in map.keyed() {
        if let Some(c) = find(key, name) {
            typed.push((key.to_owned(), c));
        }
    }
    let mut headers = Vec::new();
    for (i, name) in map.header_columns.iter().enumerate() {
        if let Some(c) = find(&format!("header_columns[{i}]"), name) {
            headers.push((format!("header_columns[{i}]"), c));
        }
    }
    let mut payload = PayloadKind::Json;
    for (key, c) in &typed {
        let fits = match key.as_str() {
            "payload" => match c.base.as_str() {
                "jsonb" => Some(PayloadKind::Json),
                // json too: its cast to jsonb can fail (`\u0000`).
                "json" | "text" | "varchar" | "bpchar" => Some(PayloadKind::Text),
                _ => None,
            }
            .map(|kind| payload = kind)
            .ok_or(PAYLOAD_LIKE),
            "headers" => matches!(c.base.as_str(), "jsonb" | "json")
                .then_some(())
                .ok_or("jsonb or json (an object of headers)"),
            "created_at" => matches!(c.base.as_str(), "timestamptz" | "timestamp")
                .then_some(())
                .ok_or("timestamptz or timestamp"),
            _ => text_like(c).then_some(()).ok_or(TEXT_LIKE),
        };
        if let Err(wanted) = fits {
            problems.push(type_problem(key, c, wanted));
        }
    }
    let mut header_columns = Vec::new();
    for (key, c) in headers {
        match (c.category, c.base.as_str()) {
            ('A' | 'C', _) | (_, "json" | "jsonb" | "bytea") => problems.push(type_problem(
                &key,
                c,
                "a plain value (not an array, composite, json or bytea)",
            )),
            ('N' | 'B', _) => header_columns.push((c.name.clone(), HeaderKind::Scalar)),
            _ => header_columns.push((c.name.clone(), HeaderKind::Text)),
        }
    }
    if problems.is_empty() {
        Ok(Plan {
            payload,
            header_columns,
        })
    } else {
        Err(problems)
    }
}

fn text_like(c: &Column) -> bool {
    matches!(
        c.base.as_str(),
        "text" | "varchar" | "bpchar" | "name" | "uuid" | "int2" | "int4" | "int8"
    ) || c.category == 'E'
}

fn type_problem(key: &str, c: &Column, wanted: &'static str) -> MappingProblem {
    MappingProblem::Type {
        key: key.to_owned(),
        column: c.name.clone(),
        found: c.type_name.clone(),
        wanted,
    }
}

/// The producers' table's columns, or `None` if there is no such table.
pub async fn columns(
    client: &Client,
    map: &ColumnMap,
) -> Result<Option<Vec<Column>>, tokio_postgres::Error> {
    let table = map.table.quoted();
    let exists: bool = client
        .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    // A domain is judged by its base type.
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), b.typname::text, b.typcategory::text \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             WHERE a.attrelid = to_regclass($1::text) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&table],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| Column {
                name: r.get(0),
                type_name: r.get(1),
                base: r.get(2),
                category: r.get::<_, String>(3).chars().next().unwrap_or('X'),
            })
            .collect(),
    ))
}

/// Reads the producers' table and checks the mapping against it.
pub async fn read_plan(
    client: &Client,
    map: &ColumnMap,
) -> Result<Result<Plan, Vec<MappingProblem>>, tokio_postgres::Error> {
    let columns = columns(client, map).await?;
    Ok(plan(map, columns.as_deref()))
}

/// Problems joined for one line of an error message.
pub fn describe(problems: &[MappingProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;

//! A mapped table: `layout = "debezium"` and `[source.columns]`.
//!
//! Producers keep inserting into a table of their own layout (Debezium's
//! outbox table, say). `migrate` gives that table a trigger that forwards
//! each insert, in the producer's transaction, into the relay's own table
//! beside it (`<table>_outboxd`), which the relay reads like any other.
//! This file holds the names of the producers' columns the trigger reads;
//! `crate::forward` checks them against the database and writes the trigger.

use std::collections::HashSet;
use std::str::FromStr;

use super::raw::RawColumns;
use super::{Invalid, NotOneOf, Validator};
use crate::ident::{TableName, check_ident};

/// The relay's own table beside a mapped one: `outboxevent` → `outboxevent_outboxd`.
pub const RELAY_TABLE_SUFFIX: &str = "_outboxd";

/// Debezium's outbox event router reads these columns unless told otherwise
/// (its `table.field.event.*` and `route.by.field` defaults).
pub const DEBEZIUM_COLUMNS: [(&str, &str); 5] = [
    ("id", "id"),
    ("aggregate_type", "aggregatetype"),
    ("aggregate_id", "aggregateid"),
    ("event_type", "type"),
    ("payload", "payload"),
];

/// Whose column names the source's table has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// outboxd's own table (`sql/outbox.sql`).
    Outboxd,
    /// Debezium's outbox table: `DEBEZIUM_COLUMNS`, overridable per key.
    Debezium,
}

impl FromStr for Layout {
    type Err = NotOneOf;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "outboxd" => Ok(Self::Outboxd),
            "debezium" => Ok(Self::Debezium),
            other => Err(NotOneOf::new(r#""outboxd" or "debezium""#, other)),
        }
    }
}

/// The producers' table and the columns the forwarding trigger reads.
/// Every name is a plain identifier (checked at load, quoted in SQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    /// The producers' table (the source's `table`).
    pub table: TableName,
    /// The event's unique id: the message_id unless `dedup_key` is mapped.
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    /// A column whose value is the message_id (else `id`'s).
    pub dedup_key: Option<String>,
    /// A jsonb column of headers (a flat object).
    pub headers: Option<String>,
    /// The event's time (else the time of the insert).
    pub created_at: Option<String>,
    /// Columns sent as headers named after them.
    pub header_columns: Vec<String>,
}

impl ColumnMap {
    /// `(key, column)` of every mapped single column, in a fixed order.
    pub fn keyed(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![
            ("id", self.id.as_str()),
            ("aggregate_type", self.aggregate_type.as_str()),
            ("aggregate_id", self.aggregate_id.as_str()),
            ("event_type", self.event_type.as_str()),
            ("payload", self.payload.as_str()),
        ];
        for (key, column) in [
            ("dedup_key", &self.dedup_key),
            ("headers", &self.headers),
            ("created_at", &self.created_at),
        ] {
            if let Some(c) = column {
                out.push((key, c.as_str()));
            }
        }
        out
    }

    /// The relay's own table beside the producers' one.
    pub fn relay_table(&self) -> TableName {
        relay_table(&self.table)
    }
}

/// `schema.<table>_outboxd`, cut to fit an identifier.
pub fn relay_table(table: &TableName) -> TableName {
    TableName {
        schema: table.schema.clone(),
        table: table.derived(RELAY_TABLE_SUFFIX),
    }
}

impl Validator<'_> {
    /// `layout` and `[source.columns]`: `Some(None)` for outboxd's own
    /// table, `Some(Some(map))` for a mapped one, `None` after an error.
    pub(super) fn columns(
        &mut self,
        k: &dyn Fn(&str) -> String,
        layout: Option<String>,
        raw: Option<RawColumns>,
        table: Option<&TableName>,
    ) -> Option<Option<ColumnMap>> {
        let layout_set = layout.is_some();
        let layout = match self.string_opt(&k("layout"), layout) {
            Some(l) => Some(self.check(&k("layout"), l.parse::<Layout>())?),
            None if layout_set => return None,
            None => None,
        };
        let raw = match (layout, raw) {
            (None | Some(Layout::Outboxd), None) => return Some(None),
            (Some(Layout::Outboxd), Some(_)) => {
                self.invalid(
                    &k("columns"),
                    "does not apply with layout = \"outboxd\" (outboxd's own table has fixed columns); \
                     remove layout to map a table of your own, or set layout = \"debezium\"",
                );
                return None;
            }
            (_, raw) => raw.unwrap_or_default(),
        };
        let debezium = layout == Some(Layout::Debezium);
        let mut ok = true;
        let mut required = |v: &mut Self, key: &str, value: Option<String>| {
            let default = DEBEZIUM_COLUMNS
                .iter()
                .find(|(name, _)| *name == key && debezium)
                .map(|(_, c)| (*c).to_owned());
            match v.column(k, key, value) {
                Ok(Some(c)) => c,
                Ok(None) if default.is_some() => default.unwrap_or_default(),
                Ok(None) => {
                    v.invalid(
                        &k(&format!("columns.{key}")),
                        "missing; a mapped table must name this column \
                         (or set layout = \"debezium\" for Debezium's column names)",
                    );
                    ok = false;
                    String::new()
                }
                Err(()) => {
                    ok = false;
                    String::new()
                }
            }
        };
        let id = required(self, "id", raw.id);
        let aggregate_type = required(self, "aggregate_type", raw.aggregate_type);
        let aggregate_id = required(self, "aggregate_id", raw.aggregate_id);
        let event_type = required(self, "event_type", raw.event_type);
        let payload = required(self, "payload", raw.payload);
        let dedup_key = self.column(k, "dedup_key", raw.dedup_key);
        let headers = self.column(k, "headers", raw.headers);
        let created_at = self.column(k, "created_at", raw.created_at);
        let header_columns = self.header_columns(k, raw.header_columns.unwrap_or_default());
        if !ok {
            return None;
        }
        Some(Some(ColumnMap {
            table: table?.clone(),
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            dedup_key: dedup_key.ok()?,
            headers: headers.ok()?,
            created_at: created_at.ok()?,
            header_columns: header_columns?,
        }))
    }

    /// One `columns.<key>` if set: a plain identifier, or `Err` with the
    /// error recorded under the key.
    fn column(
        &mut self,
        k: &dyn Fn(&str) -> String,
        key: &str,
        value: Option<String>,
    ) -> Result<Option<String>, ()> {
        let key = k(&format!("columns.{key}"));
        if value.is_none() {
            return Ok(None);
        }
        let value = self.string_opt(&key, value).ok_or(())?;
        match check_ident(&value) {
            Ok(()) => Ok(Some(value)),
            Err(e) => {
                self.refuse(&key, Invalid::because(format!("column {value:?}"), e));
                Err(())
            }
        }
    }

    fn header_columns(
        &mut self,
        k: &dyn Fn(&str) -> String,
        values: Vec<String>,
    ) -> Option<Vec<String>> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(values.len());
        let mut ok = true;
        for (i, value) in values.into_iter().enumerate() {
            let key = k(&format!("columns.header_columns[{i}]"));
            let Some(value) = self.string_opt(&key, Some(value)) else {
                ok = false;
                continue;
            };
            if let Err(e) = check_ident(&value) {
                self.refuse(&key, Invalid::because(format!("column {value:?}"), e));
                ok = false;
            } else if !seen.insert(value.clone()) {
                self.invalid(&key, format!("column {value:?} is listed twice"));
                ok = false;
            } else {
                out.push(value);
            }
        }
        ok.then_some(out)
    }
}

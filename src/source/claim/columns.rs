//! The claimed row's columns: the select list every claim uses (polling,
//! ordered, and the wal relay's read of the table), and the decoding of a
//! row into an [`OutboxRow`], where an unreadable column makes a bad row
//! rather than an error.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use crate::message::OutboxRow;

pub const COLUMNS: [&str; 11] = [
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload::text",
    "headers::text",
    "dedup_key",
    "exchange",
    "routing_key",
    "created_at",
    "attempts",
];

/// `COLUMNS` as a select list for the table alias `alias`.
pub fn select_list(alias: &str) -> String {
    COLUMNS
        .iter()
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decodes one claimed row. Only a row without a readable id is an error
/// (the primary key cannot be NULL, so that means the table does not match
/// `sql/outbox.sql`). Any other column that cannot be read (a NULL where
/// the relay needs a value, a column of another type) makes the row a bad
/// row, named by its id and the column: it is parked, never sent, and it
/// does not fail its batch.
pub fn decode(row: &Row) -> Result<OutboxRow, tokio_postgres::Error> {
    let id: i64 = row.try_get(0)?;
    let mut problem: Option<String> = None;
    let mut get = |index: usize| -> Option<&str> {
        match row.try_get::<_, Option<&str>>(index) {
            Ok(v) => v,
            Err(e) => {
                note(&mut problem, index, &e);
                None
            }
        }
    };
    let required = |value: Option<&str>, index: usize, problem: &mut Option<String>| {
        if value.is_none() && problem.is_none() {
            *problem = Some(format!("column {} is NULL", column_name(index)));
        }
        value.unwrap_or_default().to_owned()
    };
    let aggregate_type = get(1);
    let aggregate_id = get(2);
    let event_type = get(3);
    let payload = get(4);
    // A NULL headers value means "no headers".
    let headers = get(5).unwrap_or_default().to_owned();
    let dedup_key = get(6);
    let exchange = get(7).map(str::to_owned);
    let routing_key = get(8).map(str::to_owned);
    let aggregate_type = required(aggregate_type, 1, &mut problem);
    let aggregate_id = required(aggregate_id, 2, &mut problem);
    let event_type = required(event_type, 3, &mut problem);
    let payload = required(payload, 4, &mut problem);
    let dedup_key = required(dedup_key, 6, &mut problem);
    let created_at = match optional::<SystemTime>(row, 9, &mut problem) {
        Some(t) => t,
        None => {
            if problem.is_none() {
                problem = Some(format!("column {} is NULL", column_name(9)));
            }
            UNIX_EPOCH
        }
    };
    // A NULL attempts counter is read as 0 tries so far.
    let attempts = optional::<i32>(row, 10, &mut problem).unwrap_or(0);
    Ok(OutboxRow {
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        headers,
        dedup_key,
        exchange,
        routing_key,
        created_at,
        attempts,
        undecodable: problem,
    })
}

fn optional<'a, T: FromSql<'a>>(
    row: &'a Row,
    index: usize,
    problem: &mut Option<String>,
) -> Option<T> {
    match row.try_get::<_, Option<T>>(index) {
        Ok(v) => v,
        Err(e) => {
            note(problem, index, &e);
            None
        }
    }
}

fn note(problem: &mut Option<String>, index: usize, err: &tokio_postgres::Error) {
    if problem.is_none() {
        let cause = std::error::Error::source(err)
            .map(|s| s.to_string())
            .unwrap_or_else(|| err.to_string());
        *problem = Some(format!(
            "column {} cannot be read: {cause}",
            column_name(index)
        ));
    }
}

/// The column's name without its cast (`payload`, not `payload::text`).
pub fn column_name(index: usize) -> &'static str {
    let c = COLUMNS.get(index).copied().unwrap_or("?");
    c.split("::").next().unwrap_or(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_columns_without_their_casts() {
        assert_eq!(column_name(0), "id");
        assert_eq!(column_name(4), "payload");
        assert_eq!(column_name(9), "created_at");
        assert_eq!(column_name(99), "?");
    }

    #[test]
    fn the_select_list_follows_the_column_order() {
        assert_eq!(
            select_list("o"),
            "o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload::text, \
             o.headers::text, o.dedup_key, o.exchange, o.routing_key, o.created_at, o.attempts"
        );
    }
}

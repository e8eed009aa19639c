//! Step 2: claim a batch of committed, due rows.
//!
//! `FOR UPDATE SKIP LOCKED` inside a transaction that stays open across
//! publish and confirm: two batches in flight (or two relays) never take
//! the same row, and if the relay dies the row locks go with its connection,
//! so the rows are claimed again and republished. Rows of a producer
//! transaction that has not committed are invisible here, and rows of one
//! that rolled back never existed.

use std::time::SystemTime;

use tokio_postgres::Row;

use crate::ident::TableName;
use crate::message::OutboxRow;

pub fn sql(table: &TableName) -> String {
    format!(
        "SELECT id, aggregate_type, aggregate_id, event_type, payload::text, headers::text, \
                dedup_key, exchange, routing_key, created_at, attempts \
         FROM {} \
         WHERE id > $2 AND published_at IS NULL AND NOT held AND available_at <= clock_timestamp() \
         ORDER BY id \
         LIMIT $1 \
         FOR UPDATE SKIP LOCKED",
        table.quoted()
    )
}

/// Decodes one claimed row. A column of the wrong type is an error, not a
/// panic (`check` names the column).
pub fn decode(row: &Row) -> Result<OutboxRow, tokio_postgres::Error> {
    Ok(OutboxRow {
        id: row.try_get(0)?,
        aggregate_type: row.try_get(1)?,
        aggregate_id: row.try_get(2)?,
        event_type: row.try_get(3)?,
        payload: row.try_get(4)?,
        headers: row.try_get::<_, Option<String>>(5)?.unwrap_or_default(),
        dedup_key: row.try_get(6)?,
        exchange: row.try_get(7)?,
        routing_key: row.try_get(8)?,
        created_at: row.try_get::<_, SystemTime>(9)?,
        attempts: row.try_get(10)?,
    })
}

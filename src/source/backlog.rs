//! The backlog gauges: how many rows wait, and how old the oldest is.

use tokio_postgres::Row;
use tracing::debug;

use super::Source;
use crate::ident::TableName;
use crate::telemetry::ErrorChain;

pub fn sql(table: &TableName) -> String {
    let dead = format!(
        "{}.{}",
        crate::ident::quote_ident(&table.schema),
        crate::ident::quote_ident(&table.derived("_dead"))
    );
    format!(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8, 0), \
                (SELECT count(*) FROM {dead}), \
                count(*) FILTER (WHERE held), \
                (SELECT count(*) FROM {t} h WHERE h.held AND EXISTS (SELECT 1 FROM {dead} d \
                    WHERE d.aggregate_type = h.aggregate_type AND d.aggregate_id = h.aggregate_id)) \
         FROM {t} WHERE published_at IS NULL",
        t = table.quoted()
    )
}

/// Sets `outboxd_pending_messages` and `outboxd_oldest_pending_age_seconds`
/// from one run of [`sql`] (run by the listener, on its connection).
pub fn record(source: &Source, result: Result<Row, tokio_postgres::Error>) {
    let decoded = result.and_then(|row| {
        Ok((
            row.try_get::<_, i64>(0)?,
            row.try_get::<_, f64>(1)?,
            row.try_get::<_, i64>(2)?,
            row.try_get::<_, i64>(3)?,
            row.try_get::<_, i64>(4)?,
        ))
    });
    match decoded {
        Ok((count, age, dead, held, held_dead)) => {
            source.metrics.held.set(held);
            source.metrics.held_by_dead_letters.set(held_dead);
            source.metrics.pending.set(count);
            source.metrics.oldest_pending_age.set(age.max(0.0));
            source.metrics.dead_letters.set(dead);
        }
        Err(err) => {
            // The relay loop reports the database's state; this is only a gauge.
            source.metrics.error("backlog_query").inc();
            debug!(source = %source.config.name, error = %ErrorChain(&err), "backlog query failed");
        }
    }
}

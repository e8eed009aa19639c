//! The backlog gauges: how many rows wait, and how old the oldest is.

use tokio_postgres::Row;
use tracing::debug;

use super::Source;
use crate::config::{OnPark, Ordering, SourceConfig};
use crate::telemetry::ErrorChain;

pub fn sql(config: &SourceConfig) -> String {
    let table = &config.table;
    let dead = format!(
        "{}.{}",
        crate::ident::quote_ident(&table.schema),
        crate::ident::quote_ident(&table.derived("_dead"))
    );
    // Rows waiting behind an earlier row of their aggregate: all but one
    // (the head) of each aggregate's unsent rows.
    let waiting = match config.ordering {
        Ordering::Aggregate => "count(*) - count(DISTINCT (aggregate_type, aggregate_id))",
        Ordering::None => "0::bigint",
    };
    // Of those, the rows of aggregates with a parked row: one index probe
    // per parked aggregate (the dead-letter table is small).
    let behind_dead = match (config.ordering, config.on_park) {
        (Ordering::Aggregate, OnPark::Hold) => format!(
            "(SELECT COALESCE(sum(x.c), 0)::bigint \
               FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM {dead}) d, \
               LATERAL (SELECT count(*) AS c FROM {t} o WHERE o.aggregate_type = d.aggregate_type \
                          AND o.aggregate_id = d.aggregate_id AND o.published_at IS NULL) x)",
            t = table.quoted()
        ),
        _ => "0::bigint".to_owned(),
    };
    format!(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8, 0), \
                (SELECT count(*) FROM {dead}), {waiting}, {behind_dead} \
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

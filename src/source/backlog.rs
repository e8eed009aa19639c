//! The backlog gauges: how many rows wait, and how old the oldest is.

use crate::metrics::SourceError;
use tokio_postgres::Row;
use tracing::{debug, warn};

use super::Source;
use super::health::Stuck;
use crate::config::{AfterPublish, OnPark, SourceConfig};
use crate::telemetry::ErrorChain;

pub fn sql(config: &SourceConfig) -> String {
    let table = &config.table;
    let dead = table.sibling("_dead");
    // Rows a claim marked held: waiting for an earlier row of their
    // aggregate (retrying, parked, or in flight in strict mode), skipped by
    // claims until it is delivered. Counted in the scan the other figures
    // make anyway: counting every aggregate's rows behind its head instead
    // (count(DISTINCT aggregate)) sorted the whole backlog, 260 ms per
    // run at 100k rows, several times the cost of the rest.
    let waiting = "count(*) FILTER (WHERE held)";
    // Of those, the rows of aggregates with a parked row: one index probe
    // per parked aggregate (the dead-letter table is small).
    let behind_dead = match (config.ordering.ordered(), config.on_park) {
        (true, OnPark::Hold) => format!(
            "(SELECT COALESCE(sum(x.c), 0)::bigint \
               FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM {dead}) d, \
               LATERAL (SELECT count(*) AS c FROM {t} o WHERE o.aggregate_type = d.aggregate_type \
                          AND o.aggregate_id = d.aggregate_id AND o.published_at IS NULL) x)",
            t = table.quoted()
        ),
        _ => "0::bigint".to_owned(),
    };
    // The relay never sets published_at in delete mode: a row that has it
    // was marked by someone else and will never be claimed. Counted (and
    // warned about), never silently left.
    let unclaimable = match config.after_publish {
        AfterPublish::Delete => format!(
            "(SELECT count(*) FROM {t} WHERE published_at IS NOT NULL)",
            t = table.quoted()
        ),
        AfterPublish::Mark => "0::bigint".to_owned(),
    };
    format!(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8, 0), \
                (SELECT count(*) FROM {dead}), {waiting}, {behind_dead}, \
                COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at) FILTER (WHERE NOT held))::float8, 0), \
                {unclaimable} \
         FROM {t} WHERE published_at IS NULL",
        t = table.quoted()
    )
}

/// Sets `outboxd_pending_messages` and `outboxd_oldest_pending_age_seconds`
/// from one run of [`sql`] (run by the listener, on its connection).
pub fn record<E: std::error::Error>(source: &Source, result: Result<Row, E>) {
    let decoded = match result {
        Ok(row) => decode(&row).map_err(|e| ErrorChain(&e).to_string()),
        Err(e) => Err(ErrorChain(&e).to_string()),
    };
    match decoded {
        Ok(b) => {
            let before = source.metrics.unclaimable.get();
            source.metrics.unclaimable.set(b.unclaimable);
            if b.unclaimable > 0 && b.unclaimable != before {
                warn!(
                    source = %source.config.name,
                    rows = b.unclaimable,
                    "rows in the outbox have published_at set, which the relay never does with after_publish = \"delete\"; they will never be sent (clear published_at to send them, or delete them)"
                );
            }
            source
                .metrics
                .oldest_sendable_age
                .set(b.oldest_sendable_age_seconds);
            source.health.set_stuck(Stuck {
                dead_letters: b.dead_letters,
                held_by_dead_letters: b.held_by_dead_letters,
                unclaimable: b.unclaimable,
                oldest_sendable_age_seconds: b.oldest_sendable_age_seconds,
            });
            source.metrics.held.set(b.held);
            source
                .metrics
                .held_by_dead_letters
                .set(b.held_by_dead_letters);
            source.metrics.pending.set(b.pending);
            source.metrics.oldest_pending_age.set(b.oldest_age_seconds);
            source.metrics.dead_letters.set(b.dead_letters);
        }
        Err(err) => {
            // The relay loop reports the database's state; this is only a gauge.
            source.metrics.error(SourceError::BacklogQuery).inc();
            debug!(source = %source.config.name, error = %err, "backlog query failed");
        }
    }
}

/// One run of [`sql`], decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Unpublished rows.
    pub pending: i64,
    /// Age of the oldest of them, 0 when there is none.
    pub oldest_age_seconds: f64,
    pub dead_letters: i64,
    pub held: i64,
    pub held_by_dead_letters: i64,
    pub oldest_sendable_age_seconds: f64,
    pub unclaimable: i64,
}

/// Decodes one row of [`sql`] (also read by `outboxd status`).
pub fn decode(row: &Row) -> Result<Backlog, tokio_postgres::Error> {
    Ok(Backlog {
        pending: row.try_get(0)?,
        oldest_age_seconds: row.try_get::<_, f64>(1)?.max(0.0),
        dead_letters: row.try_get(2)?,
        held: row.try_get(3)?,
        held_by_dead_letters: row.try_get(4)?,
        oldest_sendable_age_seconds: row.try_get::<_, f64>(5)?.max(0.0),
        unclaimable: row.try_get(6)?,
    })
}

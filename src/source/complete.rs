//! Step 5: settle a batch in the claim transaction. Delivered rows are
//! deleted (or marked). A failed row is either retried (`attempts + 1`, its
//! `last_error`, and an `available_at` in the future, so it steps aside for
//! the backoff time while the rest of the table keeps flowing) or parked:
//! moved to the dead-letter table, where it no longer blocks anything and
//! an operator can see it and replay it. [`decide`] is the one place that
//! chooses between the two.

use deadpool_postgres::Transaction;

use crate::config::AfterPublish;
use crate::ident::TableName;
use crate::sink::FailureReason;

/// `last_error` is for people; a few hundred bytes say enough.
const MAX_ERROR_CHARS: usize = 500;

/// What happens to a row that was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Retry,
    Park,
}

/// Retry or park a row that failed for `reason` on attempt number `attempt`
/// (1 for the first try).
pub fn decide(reason: FailureReason, attempt: u32, max_attempts: u32) -> Disposition {
    match reason {
        // The row's content is the problem; trying again cannot help.
        FailureReason::BadRow => Disposition::Park,
        // The broker refuses this row (no route, no exchange, a full queue
        // that rejects): likely to need an operator after enough tries.
        FailureReason::Returned | FailureReason::Nacked | FailureReason::ExchangeNotFound => {
            if attempt >= max_attempts {
                Disposition::Park
            } else {
                Disposition::Retry
            }
        }
        // The broker or the link failed, not the row: never park for it,
        // however long an outage lasts.
        FailureReason::Timeout | FailureReason::Connection => Disposition::Retry,
    }
}

pub struct Sql {
    delivered: String,
    failed: String,
    parked: String,
}

impl Sql {
    pub fn new(table: &TableName, after: AfterPublish) -> Self {
        let t = table.quoted();
        let dead = format!(
            "{}.{}",
            crate::ident::quote_ident(&table.schema),
            crate::ident::quote_ident(&table.derived("_dead"))
        );
        let delivered = match after {
            AfterPublish::Delete => format!("DELETE FROM {t} WHERE id = ANY($1)"),
            AfterPublish::Mark => {
                format!("UPDATE {t} SET published_at = clock_timestamp() WHERE id = ANY($1)")
            }
        };
        let failed = format!(
            "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = f.err, \
                 available_at = clock_timestamp() + f.delay_ms * interval '1 millisecond' \
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS f(id, err, delay_ms) \
             WHERE o.id = f.id"
        );
        let parked = format!(
            "WITH moved AS (DELETE FROM {t} WHERE id = ANY($1) RETURNING *) \
             INSERT INTO {dead} (id, aggregate_type, aggregate_id, event_type, payload, headers, \
                 dedup_key, exchange, routing_key, created_at, attempts, last_error, reason, parked_at) \
             SELECT m.id, m.aggregate_type, m.aggregate_id, m.event_type, m.payload, m.headers, \
                 m.dedup_key, m.exchange, m.routing_key, m.created_at, m.attempts + 1, p.err, p.reason, \
                 clock_timestamp() \
             FROM moved m JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS p(id, err, reason) \
                 ON p.id = m.id"
        );
        Self {
            delivered,
            failed,
            parked,
        }
    }
}

/// The rows of a batch that did not get through: retried ones (one UPDATE)
/// and parked ones (one move to the dead-letter table).
#[derive(Default)]
pub struct Failed {
    pub ids: Vec<i64>,
    pub errors: Vec<String>,
    pub delays_ms: Vec<i64>,
    pub parked_ids: Vec<i64>,
    pub parked_errors: Vec<String>,
    pub parked_reasons: Vec<String>,
}

impl Failed {
    pub fn retry(&mut self, id: i64, error: &str, delay_ms: i64) {
        self.ids.push(id);
        self.errors
            .push(error.chars().take(MAX_ERROR_CHARS).collect());
        self.delays_ms.push(delay_ms);
    }

    pub fn park(&mut self, id: i64, error: &str, reason: FailureReason) {
        self.parked_ids.push(id);
        self.parked_errors
            .push(error.chars().take(MAX_ERROR_CHARS).collect());
        self.parked_reasons.push(reason.as_str().to_owned());
    }
}

pub async fn settle(
    tx: &Transaction<'_>,
    sql: &Sql,
    delivered: &[i64],
    failed: &Failed,
) -> Result<(), tokio_postgres::Error> {
    if !delivered.is_empty() {
        let stmt = tx.prepare_cached(&sql.delivered).await?;
        tx.execute(&stmt, &[&delivered]).await?;
    }
    if !failed.ids.is_empty() {
        let stmt = tx.prepare_cached(&sql.failed).await?;
        tx.execute(&stmt, &[&failed.ids, &failed.errors, &failed.delays_ms])
            .await?;
    }
    if !failed.parked_ids.is_empty() {
        let stmt = tx.prepare_cached(&sql.parked).await?;
        tx.execute(
            &stmt,
            &[
                &failed.parked_ids,
                &failed.parked_errors,
                &failed.parked_reasons,
            ],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureReason::*;

    #[test]
    fn decides_retry_or_park_in_one_place() {
        let cases = [
            // a bad row is parked on its first attempt
            (BadRow, 1, 10, Disposition::Park),
            // refused by the broker: retried until the last attempt...
            (Returned, 1, 10, Disposition::Retry),
            (Nacked, 9, 10, Disposition::Retry),
            // ...and parked on it
            (ExchangeNotFound, 10, 10, Disposition::Park),
            (Returned, 11, 10, Disposition::Park),
            // max_attempts = 1 parks at the first refusal
            (Nacked, 1, 1, Disposition::Park),
            // outages never park, however many attempts
            (Timeout, 1000, 10, Disposition::Retry),
            (Connection, 1000, 10, Disposition::Retry),
        ];
        for (reason, attempt, max, want) in cases {
            assert_eq!(
                decide(reason, attempt, max),
                want,
                "{reason} attempt {attempt}/{max}"
            );
        }
    }
}

//! Step 5: settle a batch in the claim transaction. Delivered rows are
//! deleted (or marked); failed rows get `attempts + 1`, their `last_error`
//! and an `available_at` in the future, so they step aside for the backoff
//! time while the rest of the table keeps flowing.

use deadpool_postgres::Transaction;

use crate::config::AfterPublish;
use crate::ident::TableName;

/// `last_error` is for people; a few hundred bytes say enough.
const MAX_ERROR_CHARS: usize = 500;

pub struct Sql {
    delivered: String,
    failed: String,
}

impl Sql {
    pub fn new(table: &TableName, after: AfterPublish) -> Self {
        let t = table.quoted();
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
        Self { delivered, failed }
    }
}

/// The rows of a batch that did not get through, ready for one UPDATE.
#[derive(Default)]
pub struct Failed {
    pub ids: Vec<i64>,
    pub errors: Vec<String>,
    pub delays_ms: Vec<i64>,
}

impl Failed {
    pub fn push(&mut self, id: i64, error: &str, delay_ms: i64) {
        self.ids.push(id);
        self.errors
            .push(error.chars().take(MAX_ERROR_CHARS).collect());
        self.delays_ms.push(delay_ms);
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
    Ok(())
}

//! The backlog gauges: how many rows wait, and how old the oldest is.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Source, step};
use crate::ident::TableName;

pub fn sql(table: &TableName) -> String {
    format!(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8, 0) \
         FROM {} WHERE published_at IS NULL",
        table.quoted()
    )
}

/// Refreshes `outboxd_pending_messages` and `outboxd_oldest_pending_age_seconds`
/// every `interval` until `stop` fires.
pub async fn run(source: Arc<Source>, interval: std::time::Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match refresh(&source).await {
            Ok((count, age)) => {
                source.metrics.pending.set(count);
                source.metrics.oldest_pending_age.set(age.max(0.0));
            }
            Err(err) => {
                // The relay loop reports the database state; this is only a gauge.
                source.metrics.error("backlog_query").inc();
                debug!(source = %source.config.name, error = %err, "backlog query failed");
            }
        }
    }
}

async fn refresh(source: &Source) -> Result<(i64, f64), super::DbError> {
    let client = step("get a connection", source.pool.get()).await?;
    let row = step(
        "backlog query",
        client.query_one(&source.queries.backlog, &[]),
    )
    .await?;
    let count: i64 = step("decode backlog", std::future::ready(row.try_get(0))).await?;
    let age: f64 = step("decode backlog", std::future::ready(row.try_get(1))).await?;
    Ok((count, age))
}

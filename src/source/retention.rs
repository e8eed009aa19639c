//! Retention for `after_publish = "mark"`: delete published rows older than
//! `retention`, in small batches so no statement holds many locks or bloats
//! one transaction.

use crate::metrics::SourceError;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Source, step};

const BATCH: i64 = 1000;
const EVERY: Duration = Duration::from_secs(30);

fn sql(source: &Source) -> String {
    let t = source.config.table.quoted();
    format!(
        "DELETE FROM {t} WHERE id IN (\
             SELECT id FROM {t} \
             WHERE published_at IS NOT NULL AND published_at < clock_timestamp() - $1 * interval '1 second' \
             LIMIT $2 FOR UPDATE SKIP LOCKED)"
    )
}

pub async fn run(source: Arc<Source>, retention: Duration, stop: CancellationToken) {
    let sql = sql(&source);
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut total = 0u64;
        loop {
            let deleted = async {
                let client = step("get a connection", source.pool.get()).await?;
                step(
                    "retention delete",
                    client.execute(&sql, &[&retention.as_secs_f64(), &BATCH]),
                )
                .await
            }
            .await;
            match deleted {
                Ok(n) => {
                    total += n;
                    if n < BATCH as u64 || stop.is_cancelled() {
                        break;
                    }
                }
                Err(err) => {
                    source.metrics.error(SourceError::Database).inc();
                    warn!(source = %source.config.name, error = %err, "retention delete failed; will try again");
                    break;
                }
            }
        }
        if total > 0 {
            info!(source = %source.config.name, rows = total, "retention removed published rows");
        }
    }
}

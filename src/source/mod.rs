//! The database side of one source: its pool, its wake-ups, the claim and
//! completion statements, and the background upkeep (backlog gauge, retention).

pub mod backlog;
pub mod claim;
pub mod complete;
pub mod flag;
pub mod health;
pub mod order;
pub mod pool;
pub mod retention;
pub mod wakeup;

use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{Notify, watch};

use crate::config::SourceConfig;
use crate::metrics::SourceMetrics;
use crate::sink::rabbitmq::Publisher;
pub use health::SourceHealth;

/// Statement timeout we apply on our side to every database round trip, so a
/// silently dead connection cannot wedge a batch forever.
pub const DB_TIMEOUT: Duration = Duration::from_secs(30);

/// SQL text for one source, built once from its (validated, quoted) table name.
pub struct Queries {
    pub claim: String,
    pub complete: complete::Sql,
    pub backlog: String,
    pub flag: flag::Sql,
    /// Whether the dead-letter table exists.
    pub dead_exists: String,
    /// `ordering = "aggregate"`: claims, releases, the sweep, relay count.
    pub order: order::Sql,
    pub lock_keys: order::LockKeys,
}

/// Everything one source's tasks share.
pub struct Source {
    pub config: SourceConfig,
    pub pool: Pool,
    pub publisher: Publisher,
    pub metrics: SourceMetrics,
    pub health: Arc<SourceHealth>,
    pub queries: Queries,
    /// Woken by NOTIFY (through the listener) and read by the relay loop.
    pub wake: Notify,
    /// `ordering = "aggregate"`: the partitions this relay owns, kept by the
    /// listener (which holds their locks) and read by the relay loop.
    pub partitions: watch::Sender<Arc<Vec<i32>>>,
    /// Whether the dead-letter table exists: [`DEAD_UNKNOWN`] until a batch
    /// or the sweep (every 30 s) has looked, and again after a database
    /// error. While it is missing nothing is parked (failing rows are
    /// retried instead, because a batch whose parking fails would roll back
    /// and resend its delivered rows again and again) and no aggregate waits
    /// for a parked row.
    pub dead_table: AtomicU8,
}

pub const DEAD_UNKNOWN: u8 = 0;
pub const DEAD_EXISTS: u8 = 1;
pub const DEAD_MISSING: u8 = 2;

impl Source {
    pub fn new(
        config: SourceConfig,
        pool: Pool,
        publisher: Publisher,
        metrics: SourceMetrics,
    ) -> Self {
        let order = order::Sql::new(&config);
        let release = (config.ordering == crate::config::Ordering::Aggregate)
            .then(|| order.release_next.clone());
        let queries = Queries {
            claim: claim::sql(&config.table),
            complete: complete::Sql::new(&config.table, config.after_publish, release),
            backlog: backlog::sql(&config),
            flag: flag::Sql::new(&config.table),
            dead_exists: format!(
                "SELECT to_regclass({}) IS NOT NULL",
                crate::ident::quote_literal(&config.table.sibling("_dead"))
            ),
            order,
            lock_keys: order::LockKeys::new(&config.table),
        };
        metrics.up.set(0);
        Self {
            health: Arc::new(SourceHealth::new(&config.name)),
            config,
            pool,
            publisher,
            metrics,
            queries,
            wake: Notify::new(),
            partitions: watch::Sender::new(Arc::new(Vec::new())),
            dead_table: AtomicU8::new(DEAD_UNKNOWN),
        }
    }
}

/// Opens one connection outside the pool, in the source's TLS mode, and
/// drives it on a task of its own (for migrate, check and dead-letters).
pub async fn connect(config: &SourceConfig) -> Result<tokio_postgres::Client, String> {
    // A host that accepts the connection and then says nothing must not
    // hang `check`, `migrate` or `dead-letters`.
    tokio::time::timeout(DB_TIMEOUT, connect_inner(config))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {DB_TIMEOUT:?}")))
}

async fn connect_inner(config: &SourceConfig) -> Result<tokio_postgres::Client, String> {
    let chain = |e: tokio_postgres::Error| crate::telemetry::ErrorChain(&e).to_string();
    match crate::tls::pg_connector(&config.tls)? {
        None => {
            let (client, connection) = config
                .database
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(chain)?;
            tokio::spawn(connection);
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = config.database.connect(tls).await.map_err(chain)?;
            tokio::spawn(connection);
            Ok(client)
        }
    }
}

/// A database step that failed, with the step named for the log.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{step}: {message}")]
    Failed { step: &'static str, message: String },
    #[error("{step}: no answer within {DB_TIMEOUT:?}")]
    TimedOut { step: &'static str },
}

/// Runs one database step with [`DB_TIMEOUT`] and names it in any error.
pub async fn step<T, E>(
    step: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, DbError>
where
    E: std::error::Error,
{
    match tokio::time::timeout(DB_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DbError::Failed {
            step,
            message: crate::telemetry::ErrorChain(&e).to_string(),
        }),
        Err(_) => Err(DbError::TimedOut { step }),
    }
}

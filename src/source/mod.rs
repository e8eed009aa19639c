//! The database side of one source: where rows come from (the polling
//! [`Capture`]: claim, settle), its pool, its wake-ups, and the background
//! upkeep (backlog gauges, retention). Nothing here knows the broker.

pub mod backlog;
pub mod capture;
pub mod claim;
pub mod command;
pub mod complete;
pub mod dead;
pub mod flag;
pub mod health;
pub mod liveness;
#[cfg(test)]
pub mod memory;
pub mod order;
pub mod pause;
pub mod poll;
pub mod pool;
pub mod retention;
pub mod wakeup;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{Notify, watch};

use crate::config::SourceConfig;
use crate::metrics::SourceMetrics;
pub use capture::{Capture, Claim, ClaimFrom, Claimed, FlagSet};
pub use complete::{Plan, Settled};
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
    /// `ordering = "aggregate"`: claims, releases, the sweep, relay count.
    pub order: order::Sql,
    pub lock_keys: order::LockKeys,
    /// Reads the operator's pause flag (`pause.rs`).
    pub paused: String,
}

/// One source database: everything its tasks share. It is the polling
/// [`Capture`] of the relay loop (see `capture.rs`).
pub struct Source {
    pub config: SourceConfig,
    pub pool: Pool,
    pub metrics: SourceMetrics,
    pub health: Arc<SourceHealth>,
    pub queries: Queries,
    /// Woken by NOTIFY (through the listener) and read by the relay loop.
    pub wake: Notify,
    /// `ordering = "aggregate"`: the partitions this relay owns, kept by the
    /// listener (which holds their locks) and read by the relay loop.
    pub partitions: watch::Sender<Arc<Vec<i32>>>,
    pub dead: dead::DeadTable,
}

impl Source {
    pub fn new(
        config: SourceConfig,
        pool: Pool,
        metrics: SourceMetrics,
        health: Arc<SourceHealth>,
    ) -> Self {
        let order = order::Sql::new(&config);
        let release = config
            .ordering
            .ordered()
            .then(|| order.release_next.clone());
        let queries = Queries {
            claim: claim::sql(&config.table),
            complete: complete::Sql::new(&config.table, config.after_publish, release),
            backlog: backlog::sql(&config),
            flag: flag::Sql::new(&config.table),
            order,
            lock_keys: order::LockKeys::new(&config.table),
            paused: pause::read_sql(&config.table),
        };
        metrics.up.set(0);
        Self {
            dead: dead::DeadTable::new(&config.name, &config.table),
            health,
            config,
            pool,
            metrics,
            queries,
            wake: Notify::new(),
            partitions: watch::Sender::new(Arc::new(Vec::new())),
        }
    }
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// Refused, unreachable, authentication failed: tokio-postgres says
    /// which in the error's own source (print with `ErrorChain`).
    #[error("{0}")]
    Postgres(#[source] tokio_postgres::Error),
    #[error("no answer within {DB_TIMEOUT:?}")]
    TimedOut,
}

/// Opens one connection outside the pool, in the source's TLS mode, and
/// drives it on a task of its own (for migrate, check and dead-letters).
pub async fn connect(config: &SourceConfig) -> Result<tokio_postgres::Client, ConnectError> {
    // A host that accepts the connection and then says nothing must not
    // hang `check`, `migrate` or `dead-letters`.
    tokio::time::timeout(DB_TIMEOUT, connect_inner(config))
        .await
        .unwrap_or(Err(ConnectError::TimedOut))
}

async fn connect_inner(config: &SourceConfig) -> Result<tokio_postgres::Client, ConnectError> {
    match crate::tls::pg_connector(&config.tls)? {
        None => {
            let (client, connection) = config
                .database
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(ConnectError::Postgres)?;
            tokio::spawn(connection);
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = config
                .database
                .connect(tls)
                .await
                .map_err(ConnectError::Postgres)?;
            tokio::spawn(connection);
            Ok(client)
        }
    }
}

/// A database step that failed, with the step named and its cause kept.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{step} failed")]
    Failed {
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{step}: no answer within {DB_TIMEOUT:?}")]
    TimedOut { step: &'static str },
}

/// Runs one database step with [`DB_TIMEOUT`] and names it in any error.
pub async fn step<T, E>(
    step: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, DbError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(DB_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DbError::Failed {
            step,
            source: Box::new(e),
        }),
        Err(_) => Err(DbError::TimedOut { step }),
    }
}

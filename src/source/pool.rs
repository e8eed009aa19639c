//! The connection pool for claim and completion (never for LISTEN: deadpool
//! drives its connections with `connection.await`, which drops notifications).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::SourceConfig;
use crate::tls::TlsError;

/// How long a batch waits for a free connection before it counts as a database error.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
const CREATE_TIMEOUT: Duration = Duration::from_secs(10);
const RECYCLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a source's pool cannot be built (no connection is involved yet).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot build the connection pool for source {name:?}: {source}")]
    Tls {
        name: String,
        #[source]
        source: TlsError,
    },
    #[error("cannot build the connection pool for source {name:?}: {source}")]
    Build {
        name: String,
        #[source]
        source: deadpool_postgres::BuildError,
    },
}

/// Builds the pool; no connection is opened until the first batch needs one,
/// so a database that is down at start only delays that source.
/// `confirm_timeout` bounds how long a batch's transaction may sit idle
/// (see `liveness`).
pub fn build(config: &SourceConfig, confirm_timeout: Duration) -> Result<Pool, PoolError> {
    let mut database = config.database.clone();
    super::liveness::keepalives(&mut database);
    // An outbox table's statistics are nearly always stale (it fills and
    // empties between autovacuum runs). With stale stats the planner picks
    // a bitmap scan that reads and sorts every pending row to return the
    // first few hundred: measured at 250 ms for 40k pending rows instead of
    // 10 ms. Without sorts, the claim can only walk the pending index in id
    // order and stop at LIMIT. Set for the session, so no claim pays a
    // round trip for it; these connections run nothing that needs a sort.
    // jit=off with it: a sort the plan cannot avoid (the aggregate claim
    // orders partitions by age) then carries enable_sort's huge penalty
    // cost, which crosses jit_above_cost, and the JIT compile took ~100 ms
    // on every claim. Short OLTP statements never gain from JIT anyway.
    //
    //
    // A batch holds rows and partitions in its transaction: the server ends
    // it when the relay goes silent (`liveness`), through the keepalives
    // above and an idle-in-transaction limit.
    let settings = format!(
        "-c enable_sort=off -c jit=off -c idle_in_transaction_session_timeout={}",
        super::liveness::as_setting_ms(super::liveness::batch_idle_limit(confirm_timeout))
    );
    super::liveness::add_options(&mut database, &settings);
    let manager_config = ManagerConfig {
        // `Fast` only checks that the connection is not closed; a dead
        // one fails its next query, which the relay retries anyway.
        recycling_method: RecyclingMethod::Fast,
    };
    let tls = crate::tls::pg_connector(&config.tls).map_err(|source| PoolError::Tls {
        name: config.name.clone(),
        source,
    })?;
    let manager = match tls {
        None => Manager::from_config(database, NoTls, manager_config),
        Some(tls) => Manager::from_config(database, tls, manager_config),
    };
    Pool::builder(manager)
        .max_size(config.pool_size)
        // Most recently used first: an idle source keeps reusing one
        // connection, and the others age out (see `reap_idle`).
        .queue_mode(QueueMode::Lifo)
        .wait_timeout(Some(WAIT_TIMEOUT))
        .create_timeout(Some(CREATE_TIMEOUT))
        .recycle_timeout(Some(RECYCLE_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|source| PoolError::Build {
            name: config.name.clone(),
            source,
        })
}

/// Pooled connections unused for this long are closed: after a busy spell
/// an idle source goes back to one pooled connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Closes idle connections unused for [`IDLE_TIMEOUT`] (the relay calls
/// this on its poll ticks).
pub fn reap_idle(pool: &Pool) {
    pool.retain(|_, metrics| metrics.last_used() < IDLE_TIMEOUT);
}

//! The partition index (`sql/outbox.sql`) that ordered claims find each
//! free partition's oldest row on: whether a table has it, and valid, for
//! `run`'s warning, `check`'s line and `migrate --concurrently`.

use deadpool_postgres::Pool;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::SourceConfig;
use crate::ident::TableName;

/// What an ordered source's table without the partition index means, for
/// `run`'s warning and `check`'s line alike.
pub const UNINDEXED: &str = "is missing (the table was migrated by an older outboxd): ordered claims still work but walk the table to find each free partition's oldest row, slowly behind a backlog; run `outboxd migrate` (`outboxd migrate --concurrently` on a large table: it does not lock out inserts)";

/// What an ordered source's table with an invalid partition index means.
pub const INVALID: &str = "exists but is not valid (a CREATE INDEX CONCURRENTLY that failed, or one still running): PostgreSQL does not use it and `outboxd migrate` skips it, so ordered claims walk the table as without it; unless a build is running, DROP INDEX CONCURRENTLY it and run `outboxd migrate --concurrently`";

/// The partition index's state on a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    Valid,
    Missing,
    /// Left by a failed (or running) `CREATE INDEX CONCURRENTLY`.
    Invalid,
}

impl IndexState {
    /// What to tell an operator, or `None` when the index serves.
    pub fn problem(self) -> Option<&'static str> {
        match self {
            IndexState::Valid => None,
            IndexState::Missing => Some(UNINDEXED),
            IndexState::Invalid => Some(INVALID),
        }
    }
}

/// The partition index of `table` (`sql/outbox.sql`), quoted, and its
/// state. Ordered claims look up each free partition's oldest row there;
/// a table migrated by an older outboxd lacks it.
pub async fn partition_index(
    client: &Client,
    table: &TableName,
) -> Result<(String, IndexState), tokio_postgres::Error> {
    let index = table.sibling("_partition_idx");
    let state = index_state(client, &index).await?;
    Ok((index, state))
}

/// Whether the index `index` (schema-qualified, quoted as in SQL) exists,
/// and if so whether PostgreSQL uses it.
pub async fn index_state(
    client: &Client,
    index: &str,
) -> Result<IndexState, tokio_postgres::Error> {
    let valid: Option<bool> = client
        .query_opt(
            "SELECT i.indisvalid FROM pg_catalog.pg_index i WHERE i.indexrelid = to_regclass($1::text)",
            &[&index],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
    Ok(match valid {
        None => IndexState::Missing,
        Some(true) => IndexState::Valid,
        Some(false) => IndexState::Invalid,
    })
}

/// `run`, at the start of an ordered polling source: warns when its table
/// lacks the partition index or has it invalid. A database error is left
/// to the relay loop, which reports it anyway.
pub async fn warn_if_unindexed(pool: Pool, config: SourceConfig, stop: CancellationToken) {
    let look = async {
        let client = pool.get().await.ok()?;
        partition_index(&client, &config.table).await.ok()
    };
    let found = tokio::select! {
        _ = stop.cancelled() => return,
        found = look => found,
    };
    if let Some((index, state)) = found
        && let Some(problem) = state.problem()
    {
        warn!(source = %config.name, %index, "the partition index {problem}");
    }
}

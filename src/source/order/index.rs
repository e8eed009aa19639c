//! The indexes that ordered claims read (`sql/outbox.sql`): the partition
//! index, on which they find each free partition's oldest row, and the
//! claim index with the partition as its second column, which their walks
//! read within their range of partitions. Whether a table has them, and
//! valid, for `run`'s warning, `check`'s lines and `migrate --concurrently`.

use deadpool_postgres::Pool;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::SourceConfig;
use crate::ident::TableName;

/// What an ordered source's table without the partition index means, for
/// `run`'s warning and `check`'s line alike.
pub const UNINDEXED: &str = "is missing (the table was migrated by an older outboxd): ordered claims still work but walk the table to find each free partition's oldest row, slowly behind a backlog; run `outboxd migrate` (`outboxd migrate --concurrently` on a large table: it does not lock out inserts)";

/// What an ordered source's table without the claim index on (id,
/// partition) means.
pub const CLAIM_UNINDEXED: &str = "is missing (the table was migrated by an older outboxd): ordered claims still work but read from the table, and hash, every row of the partitions that the other batch in flight holds; run `outboxd migrate` (`outboxd migrate --concurrently` on a large table: it does not lock out inserts)";

/// What an ordered source's table with an invalid index means.
pub const INVALID: &str = "exists but is not valid (a CREATE INDEX CONCURRENTLY that failed, or one still running): PostgreSQL does not use it and `outboxd migrate` skips it, so ordered claims work as without it; unless a build is running, DROP INDEX CONCURRENTLY it and run `outboxd migrate --concurrently`";

/// An index's state on a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    Valid,
    Missing,
    /// Left by a failed (or running) `CREATE INDEX CONCURRENTLY`.
    Invalid,
}

/// One of the indexes ordered claims read, as found on a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderedIndex {
    /// What `check` and the warning call it: "partition index", "claim index".
    pub label: &'static str,
    /// Schema-qualified, quoted.
    pub index: String,
    pub state: IndexState,
    missing: &'static str,
}

impl OrderedIndex {
    /// What to tell an operator, or `None` when the index serves.
    pub fn problem(&self) -> Option<&'static str> {
        match self.state {
            IndexState::Valid => None,
            IndexState::Missing => Some(self.missing),
            IndexState::Invalid => Some(INVALID),
        }
    }
}

/// The indexes of `table` (`sql/outbox.sql`) that ordered claims read, and
/// their states. A table migrated by an older outboxd lacks one or both.
pub async fn ordered_indexes(
    client: &Client,
    table: &TableName,
) -> Result<Vec<OrderedIndex>, tokio_postgres::Error> {
    let mut found = Vec::new();
    for (label, suffix, missing) in [
        ("partition index", "_partition_idx", UNINDEXED),
        ("claim index", "_claim_part_idx", CLAIM_UNINDEXED),
    ] {
        let index = table.sibling(suffix);
        let state = index_state(client, &index).await?;
        found.push(OrderedIndex {
            label,
            index,
            state,
            missing,
        });
    }
    Ok(found)
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
/// lacks an index that ordered claims read, or has it invalid. A database
/// error is left to the relay loop, which reports it anyway.
pub async fn warn_if_unindexed(pool: Pool, config: SourceConfig, stop: CancellationToken) {
    let look = async {
        let client = pool.get().await.ok()?;
        ordered_indexes(&client, &config.table).await.ok()
    };
    let found = tokio::select! {
        _ = stop.cancelled() => return,
        found = look => found,
    };
    for found in found.unwrap_or_default() {
        if let Some(problem) = found.problem() {
            warn!(source = %config.name, index = %found.index, "the {} {problem}", found.label);
        }
    }
}

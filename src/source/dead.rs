//! Whether a source's dead-letter table exists: one small record with the
//! one lookup that fills it.
//!
//! Parking needs the table, and so does holding an aggregate behind its
//! parked row. While it is missing nothing is parked (failing rows are
//! retried instead: a batch whose park fails would otherwise be retried
//! whole, again and again) and no aggregate waits for a parked row. The
//! answer is remembered until a database error, after which it is looked
//! up again (the table may be what went away).

use std::sync::atomic::{AtomicU8, Ordering};

use deadpool_postgres::GenericClient;
use tracing::warn;

use super::{DbError, step};
use crate::ident::{TableName, quote_literal};

const UNKNOWN: u8 = 0;
const EXISTS: u8 = 1;
const MISSING: u8 = 2;

pub struct DeadTable {
    state: AtomicU8,
    exists_sql: String,
    source: String,
}

impl DeadTable {
    pub fn new(source: &str, table: &TableName) -> Self {
        Self {
            state: AtomicU8::new(UNKNOWN),
            exists_sql: format!(
                "SELECT to_regclass({}) IS NOT NULL",
                quote_literal(&table.sibling("_dead"))
            ),
            source: source.to_owned(),
        }
    }

    /// What is known without asking: `None` until looked up.
    pub fn known(&self) -> Option<bool> {
        match self.state.load(Ordering::SeqCst) {
            EXISTS => Some(true),
            MISSING => Some(false),
            _ => None,
        }
    }

    /// Whether the table exists, looked up on `client` unless known.
    pub async fn exists(&self, client: &impl GenericClient) -> Result<bool, DbError> {
        if let Some(known) = self.known() {
            return Ok(known);
        }
        self.look(client).await
    }

    /// Looks it up now (the sweep does every 30 s), warning when it turns
    /// out missing.
    pub async fn look(&self, client: &impl GenericClient) -> Result<bool, DbError> {
        let row = step(
            "look for the dead-letter table",
            client.query_one(&self.exists_sql, &[]),
        )
        .await?;
        let exists: bool = row.try_get(0).unwrap_or(false);
        let was = self
            .state
            .swap(if exists { EXISTS } else { MISSING }, Ordering::SeqCst);
        if !exists && was != MISSING {
            warn!(source = %self.source, "the dead-letter table is missing (run `outboxd migrate`); failing rows are retried instead of parked, and no aggregate waits for a parked row");
        }
        Ok(exists)
    }

    /// Forgets the answer (after a database error).
    pub fn forget(&self) {
        self.state.store(UNKNOWN, Ordering::SeqCst);
    }
}

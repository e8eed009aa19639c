//! The `reason` label of `outboxd_source_errors_total`.

/// Where a source's database error happened: the `reason` label of
/// `outboxd_source_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceError {
    /// A claim, settle or helper statement failed; the source pauses.
    Database,
    /// The LISTEN connection was lost.
    Listener,
    /// The backlog query behind the gauges, or the listener's read of the
    /// pause flag, failed.
    BacklogQuery,
    /// The database refused to settle a row as planned (delete, park):
    /// the row was rescheduled instead.
    Settle,
    /// `capture = "wal"`: the replication stream could not start or failed.
    Replication,
}

impl SourceError {
    pub const ALL: [SourceError; 5] = [
        SourceError::Database,
        SourceError::Listener,
        SourceError::BacklogQuery,
        SourceError::Settle,
        SourceError::Replication,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceError::Database => "database",
            SourceError::Listener => "listener",
            SourceError::BacklogQuery => "backlog_query",
            SourceError::Settle => "settle",
            SourceError::Replication => "replication",
        }
    }
}

//! What the one-source commands (`dead-letters`, `slot drop`, `pause`,
//! `resume`) share: finding the source by name, connecting to it, and one
//! error type that names the source and its database in every failure.

use tokio_postgres::Client;

use super::ConnectError;
use crate::config::{Config, SourceConfig};

/// Why a command on one configured source failed; database errors keep
/// their cause as the source (tokio-postgres keeps the server's message
/// one further).
#[derive(Debug, thiserror::Error)]
pub enum SourceCommandError {
    #[error("no source named {0:?} in the config")]
    UnknownSource(String),
    #[error("source {source_name:?} ({database}): cannot connect: {source}")]
    Connect {
        source_name: String,
        database: String,
        #[source]
        source: ConnectError,
    },
    #[error("source {source_name:?} ({database}): {source}")]
    Database {
        source_name: String,
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The command will not go on; the text says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// The source named `name`.
pub fn find<'a>(config: &'a Config, name: &str) -> Result<&'a SourceConfig, SourceCommandError> {
    config
        .sources
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| SourceCommandError::UnknownSource(name.to_owned()))
}

/// A connection to the source's database.
pub async fn connect(source: &SourceConfig) -> Result<Client, SourceCommandError> {
    super::connect(source)
        .await
        .map_err(|e| SourceCommandError::Connect {
            source_name: source.name.clone(),
            database: source.database_display.clone(),
            source: e,
        })
}

/// Names the source a query failed on: `.map_err(db_error(source))`.
pub fn db_error(source: &SourceConfig) -> impl FnOnce(tokio_postgres::Error) -> SourceCommandError {
    |e| SourceCommandError::Database {
        source_name: source.name.clone(),
        database: source.database_display.clone(),
        source: e,
    }
}

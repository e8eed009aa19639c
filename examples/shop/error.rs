//! The shop's one error type. Every error a service meets while handling a
//! message is retried (see `consumer.rs`); only a message that can never be
//! handled (not JSON, no message id) is set aside.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {}", Chain(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {}", Chain(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("broker: {}", Chain(.0))]
    Amqp(#[from] lapin::Error),
    #[error("{0}")]
    Other(String),
}

/// An error and its causes on one line: tokio-postgres keeps the server's
/// message in `source()`, not in its `Display`.
pub struct Chain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(err) = cause {
            // Some errors repeat their cause's message in their own.
            let more = err.to_string();
            if !text.contains(&more) {
                text = format!("{text}: {more}");
            }
            cause = err.source();
        }
        f.write_str(&text)
    }
}

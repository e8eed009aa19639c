//! Logging: human-readable text by default, JSON on request.
//!
//! Two rules hold everywhere: payloads and credentials are never logged
//! (lapin's own line for a returned message carries the whole payload, so
//! its target is switched off for good), and errors are logged with their
//! whole cause chain, because tokio-postgres and lapin keep the useful part
//! in `source()`.

use std::error::Error;
use std::fmt;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// lapin logs each returned message at WARN with its payload; we log our
/// own line. pgwire-replication logs an ERROR each time a replication
/// session ends with an error, which includes every "slot in use" a
/// standing-by relay gets; the wal relay logs what it means instead.
const ALWAYS_OFF: &str =
    "lapin::returned_messages=off,pgwire_replication::client::tokio_client=off";

/// Logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?} (log.level or RUST_LOG)")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot install the logger")]
    Install(#[source] Box<dyn Error + Send + Sync>),
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init(format: LogFormat, level: &str) -> Result<(), LogError> {
    let base = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => env,
        _ => level.to_owned(),
    };
    let filter =
        EnvFilter::try_new(format!("{base},{ALWAYS_OFF}")).map_err(|source| LogError::Filter {
            filter: base.clone(),
            source,
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(LogError::Install)
}

/// Displays an error followed by each of its sources: `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            let text = err.to_string();
            // Many errors already repeat their cause in their own message.
            if !last.contains(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("error performing TLS handshake")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn shows_the_hidden_cause() {
        let err = Outer(std::io::Error::other("certificate not valid for name"));
        assert_eq!(
            ErrorChain(&err).to_string(),
            "error performing TLS handshake: certificate not valid for name"
        );
    }
}

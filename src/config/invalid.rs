//! Why a config value is refused, as the checks behind each key return
//! it; the `Validator` files it under the key.

use std::error::Error;
use std::fmt;

/// Why one value is refused: the reason in words and, when another error
/// is behind it, that error as the source. The reason already ends with
/// the cause's text, so a printed chain (`ErrorChain`) does not repeat it,
/// and the message alone (`to_string`) says everything.
///
/// A cause that may quote a secret is not kept, only scrubbed text: the
/// parse errors of connection strings and AMQP URLs (see `pg_url` and
/// `rabbitmq`).
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Invalid {
    reason: String,
    #[source]
    cause: Option<Box<dyn Error + Send + Sync>>,
}

impl Invalid {
    /// A reason with nothing behind it.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            cause: None,
        }
    }

    /// `context: cause`, keeping `cause` as the source.
    pub fn because(context: impl fmt::Display, cause: impl Error + Send + Sync + 'static) -> Self {
        Self {
            reason: format!("{context}: {cause}"),
            cause: Some(Box::new(cause)),
        }
    }

    /// An error whose own message is the whole reason, kept as the source.
    pub fn of(cause: impl Error + Send + Sync + 'static) -> Self {
        Self {
            reason: cause.to_string(),
            cause: Some(Box::new(cause)),
        }
    }
}

/// The typed errors of the parts a config value is checked by: each is
/// the whole reason, and stays reachable as the source.
macro_rules! invalid_from {
    ($($error:ty),+) => {$(
        impl From<$error> for Invalid {
            fn from(e: $error) -> Self {
                Self::of(e)
            }
        }
    )+};
}
invalid_from!(
    NotOneOf,
    crate::ident::TableNameError,
    crate::template::TemplateError,
    crate::tls::TlsError
);

/// A word that is not one of those a setting takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be {expected}, got {got:?}")]
pub struct NotOneOf {
    /// The words it takes, as the message lists them: `"text" or "json"`.
    pub expected: &'static str,
    pub got: String,
}

impl NotOneOf {
    pub fn new(expected: &'static str, got: &str) -> Self {
        Self {
            expected,
            got: got.to_owned(),
        }
    }
}

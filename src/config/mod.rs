//! Configuration: parse the TOML, substitute `${VAR}`, read `*_file` secrets,
//! then validate into typed settings.
//!
//! Parsing is two-step, as in most well-run daemons: serde reads a `Raw*`
//! mirror of the file (unknown keys rejected, every value still a string),
//! then [`Validator`] turns it into [`Config`], collecting every problem with
//! the key path it belongs to (`source[1].batch_size (source "billing")`)
//! instead of stopping at the first. Defaults live as consts next to the
//! field they fill and are listed in `config/outboxd.toml`.

mod capture;
mod columns;
mod format;
mod interpolate;
mod invalid;
mod pg_tls;
mod pg_url;
mod rabbitmq;
mod raw;
mod secret;
mod source;
mod toml_error;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use capture::{CaptureMode, WalCapture, default_wal_name};
pub use columns::{ColumnMap, DEBEZIUM_COLUMNS, Layout, RELAY_TABLE_SUFFIX};
pub use format::MessageFormat;
pub use invalid::{Invalid, NotOneOf};
pub use rabbitmq::{AmqpTls, RabbitConfig, RabbitNode};
pub use secret::Secret;
pub use source::{
    AfterPublish, DEFAULT_BATCH_SIZE, DEFAULT_MAX_IN_FLIGHT, DEFAULT_WAL_BATCH_SIZE, OnPark,
    Ordering, SourceConfig,
};

use interpolate::interpolate;
use raw::RawConfig;

/// Default address of the metrics and health server.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
/// Default time a SIGTERM drain may take before in-flight work is abandoned.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval of the backlog query behind `outboxd_pending_messages`.
pub const DEFAULT_BACKLOG_INTERVAL: Duration = Duration::from_secs(5);
/// Allowed `metrics.backlog_interval`: one `count(*)` per source each time.
pub const BACKLOG_INTERVAL_RANGE: DurationRange =
    DurationRange::new(Duration::from_millis(100), HOUR);
/// Allowed `shutdown.drain_timeout` (0: abandon in-flight batches at once).
pub const DRAIN_TIMEOUT_RANGE: DurationRange = DurationRange::new(Duration::ZERO, HOUR);
/// The most a `*_file` secret may hold: a URL is never that long, and a
/// file like `/dev/zero` must not be read until memory runs out.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

const HOUR: Duration = Duration::from_secs(3600);

/// The values a duration setting may take. Below `min` it cannot work (a
/// 1 ns confirm timeout fails every message); above `max` it is a mistake
/// that would also overflow the arithmetic done on it
/// (`poll_interval * 3` panicked for `"18446744073709551615s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
}

impl DurationRange {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    fn check(&self, value: Duration, text: &str) -> Result<Duration, Invalid> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(Invalid::new(format!(
                "must be between {} and {}, got {text:?}",
                humantime::format_duration(self.min),
                humantime::format_duration(self.max)
            )))
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub rabbitmq: RabbitConfig,
    pub drain_timeout: Duration,
    pub sources: Vec<SourceConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = NotOneOf;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(NotOneOf::new(r#""text" or "json""#, other)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    pub backlog_interval: Duration,
}

/// Everything that can be wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Text only: the TOML parser's own error quotes the line, which may
    /// hold a password (see `toml_error`).
    #[error("{0}")]
    Syntax(String),
    #[error("{key}: {reason}")]
    Invalid {
        key: String,
        #[source]
        reason: Invalid,
    },
    #[error("{key}: environment variable `{var}` is not set")]
    MissingVariable { key: String, var: String },
    #[error("{}", list(.0))]
    Many(Vec<ConfigError>),
}

fn list(errors: &[ConfigError]) -> String {
    let mut out = format!("{} problems:", errors.len());
    for e in errors {
        out.push_str("\n  - ");
        out.push_str(&e.to_string());
    }
    out
}

impl Config {
    /// Reads and validates the file at `path`, taking `${VAR}` from the
    /// process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, &|name| std::env::var(name).ok()).map_err(|e| match e {
            ConfigError::Syntax(msg) => ConfigError::Syntax(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates config text; `env` answers `${VAR}` lookups.
    pub fn from_toml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax(toml_error::describe(text, &e)))?;
        let mut v = Validator {
            env,
            errors: Vec::new(),
        };
        let config = v.config(raw);
        match (config, v.errors.len()) {
            (Some(config), 0) => Ok(config),
            (_, 1) => Err(v.errors.remove(0)),
            _ => Err(ConfigError::Many(v.errors)),
        }
    }
}

/// Collects every problem while turning raw values into typed ones.
pub(crate) struct Validator<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let log = LogConfig {
            format: self
                .parse_opt("log.format", raw.log.format)
                .unwrap_or_default(),
            level: self
                .string_opt("log.level", raw.log.level)
                .unwrap_or_else(|| "info".to_owned()),
        };
        let listen = self
            .string_opt("metrics.listen", raw.metrics.listen)
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_owned());
        let listen = self.check(
            "metrics.listen",
            listen.parse::<SocketAddr>().map_err(|e| {
                Invalid::because(
                    format_args!(
                        "{listen:?} is not an address like \"127.0.0.1:9187\" or \"0.0.0.0:9187\""
                    ),
                    e,
                )
            }),
        );
        let backlog_interval = self
            .duration_in(
                "metrics.backlog_interval",
                raw.metrics.backlog_interval,
                BACKLOG_INTERVAL_RANGE,
            )
            .unwrap_or(DEFAULT_BACKLOG_INTERVAL);
        let drain_timeout = self
            .duration_in(
                "shutdown.drain_timeout",
                raw.shutdown.drain_timeout,
                DRAIN_TIMEOUT_RANGE,
            )
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT);
        let rabbitmq = match raw.rabbitmq {
            Some(r) => self.rabbitmq(r),
            None => {
                self.invalid("rabbitmq", "the [rabbitmq] table is missing");
                None
            }
        };
        let sources = self.sources(raw.sources);
        Some(Config {
            log,
            metrics: MetricsConfig {
                listen: listen?,
                backlog_interval,
            },
            rabbitmq: rabbitmq?,
            drain_timeout,
            sources,
        })
    }

    /// Records a problem under `key`.
    fn invalid(&mut self, key: &str, reason: impl Into<String>) {
        self.refuse(key, Invalid::new(reason));
    }

    /// Records a typed refusal (and the cause it keeps) under `key`.
    fn refuse(&mut self, key: &str, reason: Invalid) {
        self.errors.push(ConfigError::Invalid {
            key: key.to_owned(),
            reason,
        });
    }

    /// Records `result`'s error under `key`; returns the value if there was one.
    fn check<T, E: Into<Invalid>>(&mut self, key: &str, result: Result<T, E>) -> Option<T> {
        result.map_err(|e| self.refuse(key, e.into())).ok()
    }

    /// Interpolates an optional string value.
    fn string_opt(&mut self, key: &str, value: Option<String>) -> Option<String> {
        let value = value?;
        match interpolate(&value, key, self.env) {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    fn parse_opt<T>(&mut self, key: &str, value: Option<String>) -> Option<T>
    where
        T: std::str::FromStr<Err: Into<Invalid>>,
    {
        let value = self.string_opt(key, value)?;
        self.check(key, value.parse())
    }

    /// A duration within `range`, if the key is set (and valid).
    fn duration_in(
        &mut self,
        key: &str,
        value: Option<String>,
        range: DurationRange,
    ) -> Option<Duration> {
        let value = self.string_opt(key, value)?;
        let parsed = self.check(key, parse_duration(&value))?;
        self.check(key, range.check(parsed, &value))
    }

    /// A secret given either inline (`key`) or as a file (`key_file`), never both.
    fn secret(
        &mut self,
        key: &str,
        file_key: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Option<Secret> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.invalid(key, "give the value or its `_file` variant, not both");
                None
            }
            (Some(v), None) => {
                let v = self.string_opt(key, Some(v))?;
                if v.is_empty() {
                    self.invalid(key, "is empty");
                    return None;
                }
                Some(Secret::new(v))
            }
            (None, Some(path)) => {
                let path = self.string_opt(file_key, Some(path))?;
                let value = self.check(file_key, read_secret_file(&path))?;
                Some(Secret::new(value))
            }
            (None, None) => {
                self.invalid(key, "missing (set it, or its `_file` variant)");
                None
            }
        }
    }
}

/// A `*_file` secret: at most [`MAX_SECRET_FILE_BYTES`] of UTF-8 text,
/// not empty once the trailing newline that mounted secrets usually end in
/// is removed. Errors name the file, never its content.
fn read_secret_file(path: &str) -> Result<String, Invalid> {
    use std::io::Read;
    // An io error names no content.
    let unreadable = |e| Invalid::because(format_args!("cannot read {path:?}"), e);
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(Invalid::new(format!(
            "{path:?} holds more than {} KiB; a URL is never that long (is it the right file?)",
            MAX_SECRET_FILE_BYTES / 1024
        )));
    }
    // Not kept as the cause: a UTF-8 error carries the bytes it read.
    let text = String::from_utf8(bytes)
        .map_err(|_| Invalid::new(format!("{path:?} is not UTF-8 text")))?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(Invalid::new(format!("{path:?} is empty")));
    }
    Ok(value.to_owned())
}

/// Parses "250ms", "30s", "5m", "7d" and the like.
pub fn parse_duration(value: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(value).map_err(|e| {
        Invalid::because(
            format_args!("{value:?} is not a duration like \"500ms\", \"30s\" or \"7d\""),
            e,
        )
    })
}

/// Bounds for an integer setting, reported in the error.
pub(crate) fn in_range(value: i64, min: i64, max: i64) -> Result<usize, Invalid> {
    if (min..=max).contains(&value) {
        // The range check above makes this conversion lossless.
        Ok(value as usize)
    } else {
        Err(Invalid::new(format!(
            "must be between {min} and {max}, got {value}"
        )))
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[cfg(test)]
mod tests;

//! One `[[source]]` entry: a service database whose outbox table we relay.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::SslMode;

use super::capture::{CaptureMode, RawCapture};
use super::columns::ColumnMap;
use super::format::MessageFormat;
use super::pg_url::{PgUrl, parse_pg};
use super::raw::RawSource;
use super::{DurationRange, Invalid, NotOneOf, Secret, Validator, in_range};
use crate::backoff::Backoff;
use crate::ident::TableName;
use crate::template::Template;
use crate::tls::PgTls;

pub const DEFAULT_TABLE: &str = "outbox";
pub const DEFAULT_ROUTING_KEY: &str = "{aggregate_type}.{event_type}";
/// With `capture = "poll"` (the default) and [`DEFAULT_MAX_IN_FLIGHT`],
/// up to 8,000 messages in flight in two batches. Larger batches keep the
/// broker busy while a batch settles and the next one is claimed; in
/// paired `outboxd-bench --only goal-drains` runs 4,000 beat 2,000 and
/// 2,000 beat 1,000 (README, Performance, "Runs of 2026-12-07
/// (afternoon)"), at about 15 MB of the relay's RSS per 1,000. Two
/// batches rather than more: an ordered batch walks the rows of the
/// partitions it holds in id order, past the rows of the partitions other
/// batches in flight hold, so it reads about as many rows per row it
/// claims as there are batches in flight (PostgreSQL CPU per message of
/// the 1,000-aggregate drain 14.4 and 14.6 µs with 4 × 500, 9.6 and 10.4
/// µs with 2 × 1,000).
pub const DEFAULT_BATCH_SIZE: i64 = 4000;
/// With `capture = "wal"`: larger batches on its one channel did not move
/// the flows (the same runs: 2,000 and 4,000 against 1,000), and its
/// memory bound (two batches plus the events read ahead) grows with them.
pub const DEFAULT_WAL_BATCH_SIZE: i64 = 1000;
pub const MAX_BATCH_SIZE: i64 = 10_000;
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Allowed `poll_interval` (a healthy loop turns once per interval, and
/// `/healthz` allows three of them).
pub const POLL_INTERVAL_RANGE: DurationRange = DurationRange::new(MIN_POLL_INTERVAL, HOUR);
/// See [`DEFAULT_BATCH_SIZE`].
pub const DEFAULT_MAX_IN_FLIGHT: i64 = 2;
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(300);
/// Allowed `retry_initial` and `retry_max`: a row's next try is
/// `available_at = now() + delay`, which must stay a sane timestamp.
pub const RETRY_RANGE: DurationRange =
    DurationRange::new(Duration::from_millis(1), Duration::from_secs(24 * 3600));
/// Allowed `retention`: up to 100 years (36,525 days), well inside what
/// `now() - interval` can compute in PostgreSQL (timestamps end 4713 BC).
pub const RETENTION_RANGE: DurationRange =
    DurationRange::new(Duration::ZERO, Duration::from_secs(36_525 * 86_400));
/// AMQP short strings (routing keys) are at most 255 bytes.
const MAX_ROUTING_KEY_BYTES: usize = 255;
const HOUR: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_ATTEMPTS: i64 = 10;
/// 16 MiB: well under RabbitMQ's own limit (128 MiB in 3.10), and messages
/// that size are usually a mistake.
pub const DEFAULT_MAX_MESSAGE_BYTES: i64 = 16 * 1024 * 1024;
/// AMQP short strings (exchange names) are at most 255 bytes.
const MAX_EXCHANGE_BYTES: usize = 255;
/// PostgreSQL channel names are identifiers: at most 63 bytes.
const MAX_CHANNEL_BYTES: usize = 63;

/// What happens to a row once the broker has confirmed its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPublish {
    /// `DELETE` the row: the table holds only what is still to be sent.
    Delete,
    /// Set `published_at`; rows are removed later by `retention`.
    Mark,
}

impl FromStr for AfterPublish {
    type Err = NotOneOf;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "delete" => Ok(Self::Delete),
            "mark" => Ok(Self::Mark),
            other => Err(NotOneOf::new(r#""delete" or "mark""#, other)),
        }
    }
}

/// Which rows may be published side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Per aggregate `(aggregate_type, aggregate_id)`, in id order,
    /// pipelined: an aggregate's rows go out in order on one channel,
    /// several in flight at once; a failure stops the aggregate at its
    /// first unconfirmed row and what came after it is sent again, in
    /// order. The one exception (a refused row whose later sibling the
    /// broker took) is counted in `outboxd_order_breaks_total`.
    Aggregate,
    /// Per aggregate, one row in flight at a time: a row is sent only once
    /// every earlier row of its aggregate is settled. Slower; no exception.
    AggregateStrict,
    /// Any row, any batch, any relay: the fastest path.
    None,
}

impl FromStr for Ordering {
    type Err = NotOneOf;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "aggregate" => Ok(Self::Aggregate),
            "aggregate_strict" => Ok(Self::AggregateStrict),
            "none" => Ok(Self::None),
            other => Err(NotOneOf::new(
                r#""aggregate", "aggregate_strict" or "none""#,
                other,
            )),
        }
    }
}

impl Ordering {
    /// Per-aggregate order of either kind.
    pub fn ordered(self) -> bool {
        self != Self::None
    }
}

/// With `ordering = "aggregate"`: what the later rows of an aggregate do
/// once one of its rows is parked in the dead-letter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPark {
    /// Wait (counted in `outboxd_held_by_dead_letters`) until the parked row
    /// is replayed and delivered, or purged.
    Hold,
    /// Go on without it: the aggregate's order has a gap.
    Continue,
}

impl FromStr for OnPark {
    type Err = NotOneOf;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hold" => Ok(Self::Hold),
            "continue" => Ok(Self::Continue),
            other => Err(NotOneOf::new(r#""hold" or "continue""#, other)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub database_url: Secret,
    /// The parsed connection settings (the password is inside, so this type
    /// is never logged; use `database_display`).
    pub database: tokio_postgres::Config,
    /// `host:port/dbname as user`, safe to log.
    pub database_display: String,
    pub table: TableName,
    pub exchange: String,
    pub routing_key: Template,
    pub batch_size: usize,
    pub poll_interval: Duration,
    pub after_publish: AfterPublish,
    pub retention: Option<Duration>,
    pub max_in_flight: usize,
    pub ordering: Ordering,
    pub on_park: OnPark,
    pub pool_size: usize,
    pub retry: Backoff,
    /// Attempts before a row the broker keeps refusing is parked.
    pub max_attempts: u32,
    /// A payload larger than this (compact JSON) is a bad row.
    pub max_message_bytes: usize,
    /// TLS to the database (`sslmode`, `sslrootcert`).
    pub tls: PgTls,
    pub notify_channel: String,
    pub capture: CaptureMode,
    /// `message_format` (and `cloudevents_source`).
    pub format: MessageFormat,
    /// `layout = "debezium"` or `[source.columns]`: producers insert into
    /// this table, and a trigger forwards each row into `table`.
    pub mapping: Option<ColumnMap>,
}

/// Key paths for one source: `source[2].batch_size (source "billing")`.
pub(super) struct Keys {
    pub(super) index: usize,
    pub(super) name: Option<String>,
}

impl Keys {
    pub(super) fn key(&self, field: &str) -> String {
        match &self.name {
            Some(name) => format!("source[{}].{field} (source {name:?})", self.index),
            None => format!("source[{}].{field}", self.index),
        }
    }
}

impl Validator<'_> {
    pub(super) fn sources(&mut self, raw: Vec<RawSource>) -> Vec<SourceConfig> {
        if raw.is_empty() {
            self.invalid("source", "no [[source]] is configured; add at least one");
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (index, src) in raw.into_iter().enumerate() {
            let name = self.string_opt(&format!("source[{index}].name"), src.name.clone());
            if let Some(name) = &name
                && !seen.insert(name.clone())
            {
                self.invalid(
                    &format!("source[{index}].name"),
                    format!("duplicate source name {name:?}; names must be unique"),
                );
            }
            if let Some(s) = self.source(Keys { index, name }, src) {
                out.push(s);
            }
        }
        out
    }

    fn source(&mut self, keys: Keys, mut raw: RawSource) -> Option<SourceConfig> {
        let k = |f: &str| keys.key(f);
        let raw_capture = RawCapture {
            capture: raw.capture.take(),
            slot: raw.slot.take(),
            publication: raw.publication.take(),
            ordering_set: raw.ordering.is_some(),
            on_park_set: raw.on_park.is_some(),
        };
        let name = match &keys.name {
            None => {
                self.invalid(&k("name"), "missing; every source needs a unique name");
                None
            }
            Some(n) => self.check(&k("name"), check_name(n)).map(|()| n.clone()),
        };
        let url = self.secret(
            &k("database_url"),
            &k("database_url_file"),
            raw.database_url,
            raw.database_url_file,
        );
        let database = url
            .as_ref()
            .and_then(|u| self.check(&k("database_url"), parse_pg(u.expose())));
        let (url_sslmode, url_sslrootcert) = database
            .as_ref()
            .map(|d| (d.sslmode.clone(), d.sslrootcert.clone()))
            .unwrap_or_default();
        let table = self
            .string_opt(&k("table"), raw.table)
            .unwrap_or_else(|| DEFAULT_TABLE.to_owned());
        let table = self.check(&k("table"), TableName::parse(&table));
        // A mapped table forwards its inserts to the relay's own table beside
        // it; from here on `table` is the table the relay reads.
        let mapping = self.columns(&k, raw.layout.take(), raw.columns.take(), table.as_ref());
        let table = match (table, &mapping) {
            (Some(_), Some(Some(map))) => Some(map.relay_table()),
            (table, _) => table,
        };
        let exchange = self
            .string_opt(&k("exchange"), raw.exchange)
            .unwrap_or_default();
        self.check(&k("exchange"), check_exchange(&exchange));
        let routing_key = self
            .string_opt(&k("routing_key"), raw.routing_key)
            .unwrap_or_else(|| DEFAULT_ROUTING_KEY.to_owned());
        let routing_key = self.check(
            &k("routing_key"),
            Template::parse(&routing_key)
                .map_err(Invalid::from)
                .and_then(check_routing_key),
        );
        // Set: checked here; unset: the default of the capture mode, below.
        let batch_size = raw
            .batch_size
            .map(|b| self.check(&k("batch_size"), in_range(b, 1, MAX_BATCH_SIZE)));
        let poll_interval = self
            .duration_in(&k("poll_interval"), raw.poll_interval, POLL_INTERVAL_RANGE)
            .unwrap_or(DEFAULT_POLL_INTERVAL);
        let after_publish = self
            .parse_opt(&k("after_publish"), raw.after_publish)
            .unwrap_or(AfterPublish::Delete);
        let retention = self.duration_in(&k("retention"), raw.retention, RETENTION_RANGE);
        if retention.is_some() && after_publish == AfterPublish::Delete {
            self.invalid(
                &k("retention"),
                "only applies with after_publish = \"mark\" (deleted rows need no retention)",
            );
        }
        let raw_on_park_set = raw.on_park.is_some();
        let ordering = self
            .parse_opt(&k("ordering"), raw.ordering)
            .unwrap_or(Ordering::Aggregate);
        let on_park = self
            .parse_opt(&k("on_park"), raw.on_park)
            .unwrap_or(OnPark::Hold);
        if ordering == Ordering::None && raw_on_park_set {
            self.invalid(
                &k("on_park"),
                "only applies with ordering = \"aggregate\" (without ordering nothing waits for a parked row)",
            );
        }
        let max_in_flight = self.check(
            &k("max_in_flight"),
            in_range(raw.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT), 1, 64),
        );
        // One connection per batch in flight, plus one for the backlog query
        // and retention, so those never wait behind a full pipeline.
        let default_pool = max_in_flight.unwrap_or(1) as i64 + 1;
        let pool_size = self.check(
            &k("pool_size"),
            in_range(raw.pool_size.unwrap_or(default_pool), 1, 256),
        );
        let raw_retry_initial_set = raw.retry_initial.is_some();
        let retry_initial = self
            .duration_in(&k("retry_initial"), raw.retry_initial, RETRY_RANGE)
            .unwrap_or(DEFAULT_RETRY_INITIAL);
        let retry_max = self
            .duration_in(&k("retry_max"), raw.retry_max, RETRY_RANGE)
            .unwrap_or(DEFAULT_RETRY_MAX);
        if retry_initial > retry_max {
            // Blame the key that was set: a retry_max below the default
            // retry_initial is retry_max's mistake.
            if raw_retry_initial_set {
                self.invalid(
                    &k("retry_initial"),
                    format!("must be at most retry_max ({retry_max:?})"),
                );
            } else {
                self.invalid(
                    &k("retry_max"),
                    format!("must be at least retry_initial ({retry_initial:?}, its default)"),
                );
            }
        }
        let max_attempts = self.check(
            &k("max_attempts"),
            in_range(raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS), 1, 1000),
        );
        let tls = self.pg_tls(
            &k,
            (raw.sslmode, raw.sslrootcert),
            (url_sslmode, url_sslrootcert),
        );
        let max_message_bytes = self.check(
            &k("max_message_bytes"),
            in_range(
                raw.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
                1,
                512 * 1024 * 1024,
            ),
        );
        let notify_channel = match self.string_opt(&k("notify_channel"), raw.notify_channel) {
            Some(c) => Some(c),
            None => table.as_ref().map(default_channel),
        };
        if let Some(c) = &notify_channel
            && (c.is_empty() || c.len() > MAX_CHANNEL_BYTES)
        {
            self.invalid(
                &k("notify_channel"),
                format!("{c:?} must be 1 to {MAX_CHANNEL_BYTES} bytes (set notify_channel to a shorter name)"),
            );
        }
        let capture = self.capture(&k, &keys, &raw_capture);
        let batch_size = batch_size.unwrap_or_else(|| {
            let default = match &capture {
                Some(CaptureMode::Wal(_)) => DEFAULT_WAL_BATCH_SIZE,
                _ => DEFAULT_BATCH_SIZE,
            };
            // Both defaults lie within 1..=MAX_BATCH_SIZE.
            Some(default as usize)
        });
        let format = self.message_format(
            &k,
            keys.name.as_deref(),
            raw.message_format,
            raw.cloudevents_source,
        );
        let PgUrl {
            config: mut database,
            display: database_display,
            ..
        } = database?;
        let tls = tls?;
        // tokio-postgres insists on TLS when it is on, and skips it when off.
        database.ssl_mode(if tls == PgTls::Off {
            SslMode::Disable
        } else {
            SslMode::Require
        });
        Some(SourceConfig {
            name: name?,
            database_url: url?,
            database,
            database_display,
            table: table?,
            exchange,
            routing_key: routing_key?,
            batch_size: batch_size?,
            poll_interval,
            after_publish,
            retention,
            max_in_flight: max_in_flight?,
            ordering,
            on_park,
            pool_size: pool_size?,
            retry: crate::backoff::Backoff::new(retry_initial, retry_max),
            // in_range bounds it to 1..=1000.
            max_attempts: max_attempts? as u32,
            max_message_bytes: max_message_bytes?,
            tls,
            notify_channel: notify_channel?,
            capture: capture?,
            format: format?,
            mapping: mapping?,
        })
    }
}

/// The NOTIFY channel `migrate`'s trigger uses unless `notify_channel` is set.
pub fn default_channel(table: &TableName) -> String {
    format!("outboxd.{}.{}", table.schema, table.table)
}

fn check_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "{name:?} must be 1 to 64 characters of ASCII letters, digits, `_`, `-` and `.` \
             (it becomes a metrics label and a message header)"
        )))
    }
}

/// A routing-key template whose fixed text alone is too long for AMQP
/// would make every row that uses it a bad row.
fn check_routing_key(template: Template) -> Result<Template, Invalid> {
    let fixed = template.literal_len();
    if fixed <= MAX_ROUTING_KEY_BYTES {
        return Ok(template);
    }
    let what = if template.is_constant() {
        "is"
    } else {
        "has fixed text of"
    };
    Err(Invalid::new(format!(
        "{what} {fixed} bytes; AMQP routing keys are at most {MAX_ROUTING_KEY_BYTES} bytes, so every row using it would be parked"
    )))
}

/// RabbitMQ's own rule for exchange names.
fn check_exchange(name: &str) -> Result<(), Invalid> {
    if name.len() > MAX_EXCHANGE_BYTES {
        return Err(Invalid::new(format!(
            "is {} bytes long; AMQP allows {MAX_EXCHANGE_BYTES}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(Invalid::new(format!(
            "{name:?} contains {c:?}; exchange names may only contain letters, digits, `-`, `_`, `.` and `:`"
        )));
    }
    Ok(())
}

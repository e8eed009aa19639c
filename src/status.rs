//! `outboxd status`: each source as its database sees it, with no relay
//! needed: the backlog and its oldest row, held rows, dead letters, the
//! relays on the table (their listener sessions, by the member lock every
//! relay holds; see `source/order.rs`) and the partitions each holds, the
//! operator's pause flag, and for `capture = "wal"` the replication slot.
//!
//! Sources are read concurrently (a few at a time) and printed in config
//! order, as a table (`render.rs`) or as JSON; a source that cannot be
//! read is printed with its error, and named in the returned list.

mod render;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_postgres::Client;

use crate::config::{Config, Ordering, SourceConfig};
use crate::source::{backlog, order, pause};
use crate::telemetry::ErrorChain;
use crate::wal::upkeep::SLOT_SQL;

/// The longest one source may take (connect included).
const SOURCE_TIMEOUT: Duration = Duration::from_secs(40);

/// Sources read at once.
const SOURCES_AT_ONCE: usize = 8;

/// One source, as `--json` prints it (the field names are documented in
/// the README: keep them stable).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceStatus {
    pub name: String,
    pub table: String,
    pub capture: &'static str,
    pub ordering: &'static str,
    /// Why the source could not be read; the figures below are then null.
    pub error: Option<String>,
    /// `None`: the flag table predates pause (run `outboxd migrate`).
    pub paused: Option<bool>,
    /// RFC 3339.
    pub paused_since: Option<String>,
    /// Unpublished rows.
    pub backlog: Option<i64>,
    pub oldest_pending_age_seconds: Option<f64>,
    /// Rows marked held behind an earlier row of their aggregate.
    pub held: Option<i64>,
    pub dead_letters: Option<i64>,
    pub relays: Vec<RelayStatus>,
    /// `capture = "wal"` only.
    pub slot: Option<SlotStatus>,
}

/// A relay on the source's table: its listener's session (for
/// `capture = "wal"`, the session streaming from the slot).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RelayStatus {
    pub pid: i32,
    pub application_name: String,
    /// `host:port`; null for a Unix socket or a session of another role.
    pub client: Option<String>,
    /// When the session started, RFC 3339.
    pub since: Option<String>,
    /// `ordering = "aggregate"`: the partitions it holds (0..63).
    pub partitions: Vec<i32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    /// A session streams from it.
    pub active: bool,
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// WAL the slot keeps from removal.
    pub retained_bytes: Option<i64>,
}

#[derive(Serialize)]
struct Report<'a> {
    sources: &'a [SourceStatus],
}

/// Reads every source and prints them to `out`; returns the names of the
/// sources that could not be read.
pub async fn run<W: Write>(config: &Config, json: bool, mut out: W) -> Vec<String> {
    let statuses = gather(config).await;
    // A closed stdout must not turn a status into a panic.
    if json {
        let _ = serde_json::to_writer_pretty(&mut out, &Report { sources: &statuses });
        let _ = writeln!(out);
    } else {
        let _ = out.write_all(render::table(&statuses).as_bytes());
    }
    statuses
        .into_iter()
        .filter(|s| s.error.is_some())
        .map(|s| s.name)
        .collect()
}

/// Every source's status, in config order.
pub async fn gather(config: &Config) -> Vec<SourceStatus> {
    let at_once = Arc::new(Semaphore::new(SOURCES_AT_ONCE));
    let tasks: Vec<_> = config
        .sources
        .iter()
        .map(|source| {
            let (mine, at_once) = (source.clone(), at_once.clone());
            let task = tokio::spawn(async move {
                // The semaphore is never closed, so the permit always comes.
                let _permit = at_once.acquire_owned().await;
                one(&mine).await
            });
            (source, task)
        })
        .collect();
    let mut statuses = Vec::with_capacity(tasks.len());
    for (source, task) in tasks {
        statuses.push(match task.await {
            Ok(status) => status,
            Err(err) => unreadable(source, format!("the status itself failed: {err}")),
        });
    }
    statuses
}

/// Why one source could not be read.
#[derive(Debug, thiserror::Error)]
enum StatusError {
    #[error("cannot connect to {database}: {source}")]
    Connect {
        database: String,
        #[source]
        source: crate::source::ConnectError,
    },
    #[error("{what} failed: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("no answer within {SOURCE_TIMEOUT:?}")]
    TimedOut,
}

fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StatusError {
    move |source| StatusError::Query { what, source }
}

async fn one(source: &SourceConfig) -> SourceStatus {
    match tokio::time::timeout(SOURCE_TIMEOUT, read(source)).await {
        Ok(Ok(status)) => status,
        Ok(Err(err)) => unreadable(source, ErrorChain(&err).to_string()),
        Err(_) => unreadable(source, StatusError::TimedOut.to_string()),
    }
}

fn blank(source: &SourceConfig) -> SourceStatus {
    SourceStatus {
        name: source.name.clone(),
        table: source.table.to_string(),
        capture: if source.capture.wal().is_some() {
            "wal"
        } else {
            "poll"
        },
        ordering: match source.ordering {
            Ordering::Aggregate => "aggregate",
            Ordering::AggregateStrict => "aggregate_strict",
            Ordering::None => "none",
        },
        error: None,
        paused: None,
        paused_since: None,
        backlog: None,
        oldest_pending_age_seconds: None,
        held: None,
        dead_letters: None,
        relays: Vec::new(),
        slot: None,
    }
}

fn unreadable(source: &SourceConfig, error: String) -> SourceStatus {
    SourceStatus {
        error: Some(error),
        ..blank(source)
    }
}

async fn read(source: &SourceConfig) -> Result<SourceStatus, StatusError> {
    let client = crate::source::connect(source)
        .await
        .map_err(|e| StatusError::Connect {
            database: source.database_display.clone(),
            source: e,
        })?;
    let mut status = blank(source);
    // The same query as the backlog gauges.
    let row = client
        .query_one(&backlog::sql(source), &[])
        .await
        .map_err(query("the backlog query"))?;
    let b = backlog::decode(&row).map_err(query("the backlog query"))?;
    status.backlog = Some(b.pending);
    status.oldest_pending_age_seconds = Some(b.oldest_age_seconds);
    status.held = Some(b.held);
    status.dead_letters = Some(b.dead_letters);
    (status.paused, status.paused_since) = read_pause(&client, source).await?;
    match source.capture.wal() {
        Some(wal) => {
            let (slot, relay) = read_slot(&client, &wal.slot).await?;
            status.slot = Some(slot);
            status.relays.extend(relay);
        }
        None => {
            let keys = order::LockKeys::new(&source.table);
            let rows = client
                .query(order::RELAYS_SQL, &[&keys.member, &keys.partition])
                .await
                .map_err(query("looking up the relays"))?;
            for r in &rows {
                status
                    .relays
                    .push(relay(r).map_err(query("looking up the relays"))?);
            }
        }
    }
    Ok(status)
}

/// The pause flag and since when; `(None, None)` for a flag table that
/// predates pause.
async fn read_pause(
    client: &Client,
    source: &SourceConfig,
) -> Result<(Option<bool>, Option<String>), StatusError> {
    let sql = format!(
        "SELECT paused, to_json(paused_at) #>> '{{}}' FROM {} LIMIT 1",
        source.table.sibling("_wakeup")
    );
    match client.query_opt(&sql, &[]).await {
        Ok(Some(r)) => Ok((
            Some(r.try_get(0).map_err(query("reading the pause flag"))?),
            r.try_get(1).map_err(query("reading the pause flag"))?,
        )),
        Ok(None) => Ok((None, None)),
        // No column or no table: what the relays read as "not paused".
        Err(e) if pause::predates_pause(&e) => Ok((None, None)),
        Err(e) => Err(StatusError::Query {
            what: "reading the pause flag",
            source: e,
        }),
    }
}

fn relay(r: &tokio_postgres::Row) -> Result<RelayStatus, tokio_postgres::Error> {
    Ok(RelayStatus {
        pid: r.try_get(0)?,
        application_name: r.try_get(1)?,
        client: r.try_get(2)?,
        since: r.try_get(3)?,
        partitions: r.try_get(4)?,
    })
}

/// The slot (the upkeep task's query) and the session streaming from it.
async fn read_slot(
    client: &Client,
    name: &str,
) -> Result<(SlotStatus, Option<RelayStatus>), StatusError> {
    let row = client
        .query_opt(SLOT_SQL, &[&name])
        .await
        .map_err(query("the slot query"))?;
    let Some(r) = row else {
        let missing = SlotStatus {
            name: name.to_owned(),
            exists: false,
            active: false,
            active_pid: None,
            wal_status: None,
            retained_bytes: None,
        };
        return Ok((missing, None));
    };
    let get = |e| StatusError::Query {
        what: "the slot query",
        source: e,
    };
    let slot = SlotStatus {
        name: name.to_owned(),
        exists: true,
        active: r.try_get(0).map_err(get)?,
        wal_status: r.try_get(1).map_err(get)?,
        retained_bytes: r.try_get(3).map_err(get)?,
        active_pid: r.try_get(5).map_err(get)?,
    };
    let Some(pid) = slot.active_pid else {
        return Ok((slot, None));
    };
    let session = client
        .query_opt(
            "SELECT a.pid, COALESCE(a.application_name, ''), \
                 CASE WHEN a.client_addr IS NULL THEN NULL ELSE host(a.client_addr) || ':' || a.client_port END, \
                 to_json(a.backend_start) #>> '{}', '{}'::int[] \
             FROM pg_catalog.pg_stat_activity a WHERE a.pid = $1",
            &[&pid],
        )
        .await
        .map_err(query("looking up the slot's session"))?;
    let relay = match session {
        Some(r) => Some(relay(&r).map_err(query("looking up the slot's session"))?),
        None => None,
    };
    Ok((slot, relay))
}

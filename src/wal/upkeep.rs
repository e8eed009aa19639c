//! Every `metrics.backlog_interval`, for a `capture = "wal"` source: the
//! slot's gauges and state (for `/readyz`), and the table's backlog gauges
//! (the same query as for polling). On a pooled connection; a failure
//! only leaves the gauges as they were (and is counted).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::WalCapture;
use crate::metrics::{SlotMetrics, SourceError};
use crate::source::health::SlotState;
use crate::source::{Source, backlog, step};
use crate::telemetry::ErrorChain;

/// The slot, as PostgreSQL sees it (also read by `outboxd status`):
/// active, wal_status, plugin, retained and lag as bigint bytes, and the
/// pid of the session streaming from it.
pub const SLOT_SQL: &str = "SELECT s.active, s.wal_status, s.plugin, \
        (pg_current_wal_lsn() - s.restart_lsn)::bigint, \
        (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint, s.active_pid \
    FROM pg_catalog.pg_replication_slots s \
    WHERE s.slot_name = $1 AND s.database = current_database()";

pub async fn run(
    source: Arc<Source>,
    wal: WalCapture,
    slot: SlotMetrics,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let client = match step("take a connection", source.pool.get()).await {
            Ok(c) => c,
            Err(err) => {
                source.metrics.error(SourceError::BacklogQuery).inc();
                debug!(source = %source.config.name, error = %ErrorChain(&err), "slot and backlog query: no connection");
                continue;
            }
        };
        let backlog = step(
            "backlog query",
            client.query_one(&source.queries.backlog, &[]),
        )
        .await;
        backlog::record(&source, backlog);
        let row = step("slot query", client.query_opt(SLOT_SQL, &[&wal.slot])).await;
        let state = match row {
            Err(err) => {
                source.metrics.error(SourceError::BacklogQuery).inc();
                debug!(source = %source.config.name, error = %ErrorChain(&err), "slot query failed");
                continue;
            }
            Ok(None) => {
                slot.active.set(-1);
                slot.retained.set(0);
                slot.lag.set(0);
                SlotState {
                    slot: wal.slot.clone(),
                    problem: Some(
                        "missing: the replication slot does not exist (`outboxd migrate` makes it)"
                            .into(),
                    ),
                    active: false,
                }
            }
            Ok(Some(r)) => {
                let active: bool = r.try_get(0).unwrap_or(false);
                let wal_status: Option<String> = r.try_get(1).unwrap_or(None);
                let plugin: Option<String> = r.try_get(2).unwrap_or(None);
                let retained: Option<i64> = r.try_get(3).unwrap_or(None);
                let lag: Option<i64> = r.try_get(4).unwrap_or(None);
                slot.retained.set(retained.unwrap_or(0));
                slot.lag.set(lag.unwrap_or(0));
                let problem = slot_problem(wal_status.as_deref(), plugin.as_deref());
                slot.active.set(if problem.is_some() {
                    -1
                } else {
                    i64::from(active)
                });
                SlotState {
                    slot: wal.slot.clone(),
                    problem,
                    active,
                }
            }
        };
        if state.problem != last_problem {
            if let Some(p) = &state.problem {
                warn!(source = %source.config.name, slot = %wal.slot, problem = %p, "the replication slot cannot be used; /readyz reports it");
            }
            last_problem = state.problem.clone();
        }
        source.health.set_slot(state);
    }
}

/// Why a slot that exists cannot be used, from `pg_replication_slots`'
/// `wal_status` and `plugin`; `None` when it can.
pub(crate) fn slot_problem(wal_status: Option<&str>, plugin: Option<&str>) -> Option<String> {
    match (wal_status, plugin) {
        (Some("lost"), _) => Some("lost: the WAL the slot needs was removed (max_slot_wal_keep_size); drop it and run `outboxd migrate` to make a new one".to_owned()),
        (Some("unreserved"), _) => Some("unreserved: the slot is about to lose WAL it needs (max_slot_wal_keep_size)".to_owned()),
        (_, Some(p)) if p != "pgoutput" => Some(format!("the slot uses plugin {p:?}, not pgoutput; drop it or name another slot")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::slot_problem;

    #[test]
    fn a_slot_is_unusable_when_lost_unreserved_or_not_pgoutput() {
        let cases: [(Option<&str>, Option<&str>, Option<&str>); 7] = [
            // the normal states: usable
            (Some("reserved"), Some("pgoutput"), None),
            (Some("extended"), Some("pgoutput"), None),
            // no status reported (an older server): judged by the plugin alone
            (None, Some("pgoutput"), None),
            // past max_slot_wal_keep_size: WAL it needs is gone
            (Some("lost"), Some("pgoutput"), Some("lost:")),
            // about to be lost: /readyz fails before the loss
            (Some("unreserved"), Some("pgoutput"), Some("unreserved:")),
            // another plugin's stream is not ours to decode
            (
                Some("reserved"),
                Some("wal2json"),
                Some("plugin \"wal2json\""),
            ),
            // lost wins over a wrong plugin: the slot must be dropped either way
            (Some("lost"), Some("wal2json"), Some("lost:")),
        ];
        for (status, plugin, want) in cases {
            let got = slot_problem(status, plugin);
            match want {
                None => assert_eq!(got, None, "{status:?} {plugin:?}"),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(w)),
                    "{status:?} {plugin:?}: {got:?}"
                ),
            }
        }
    }
}

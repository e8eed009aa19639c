//! What `/healthz` and `/readyz` know about a source, updated by its tasks.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub struct SourceHealth {
    pub name: String,
    started: Instant,
    /// Milliseconds since `started` at the relay loop's last turn.
    beat_ms: AtomicU64,
    db_up: AtomicBool,
    listening: AtomicBool,
    /// Why the database is down; `None` while it is up, so that `/readyz`
    /// never shows a healthy source with an error that is over (the WARN
    /// log line and `outboxd_source_errors_total` keep the history).
    last_error: Mutex<Option<String>>,
    /// `ordering = "aggregate"`: the partitions we own and the relays on
    /// the table, as of the last rebalance (for `/status`).
    ownership: Mutex<(Vec<i32>, i32)>,
    /// What the last backlog query found of rows the relay cannot move.
    stuck: Mutex<Stuck>,
    /// `capture = "wal"`: the slot as last looked at; `None` for polling.
    slot: Mutex<Option<SlotState>>,
    /// `capture = "wal"`: this relay streams from the slot (else it
    /// stands by, or cannot start).
    streaming: AtomicBool,
    /// `capture = "wal"`: the slot is unusable and the table is polled.
    polling: AtomicBool,
    /// An operator paused the source (`outboxd pause`), as last read from
    /// the database; the relay loop waits on its changes.
    paused: watch::Sender<bool>,
}

/// A `capture = "wal"` source's replication slot, for `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotState {
    pub slot: String,
    /// Why the slot cannot be used (missing, lost, unreserved, wrong
    /// plugin); `None` while it can.
    pub problem: Option<String>,
    /// Some session streams from it (this relay or another).
    pub active: bool,
}

/// Rows a source holds that it cannot move on its own, for `/readyz`: a
/// source can be up and still have rows waiting for an operator.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stuck {
    /// Rows in the dead-letter table.
    pub dead_letters: i64,
    /// Rows waiting behind a parked row of their aggregate.
    pub held_by_dead_letters: i64,
    /// Rows with published_at set by someone else (delete mode).
    pub unclaimable: i64,
    /// Age of the oldest unsent row nothing holds back.
    pub oldest_sendable_age_seconds: f64,
}

impl SourceHealth {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            db_up: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            last_error: Mutex::new(None),
            ownership: Mutex::new((Vec::new(), 0)),
            stuck: Mutex::new(Stuck::default()),
            slot: Mutex::new(None),
            streaming: AtomicBool::new(false),
            polling: AtomicBool::new(false),
            paused: watch::Sender::new(false),
        }
    }

    /// Called by the relay loop on every turn.
    pub fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the relay loop last turned.
    pub fn since_beat(&self) -> Duration {
        let beat = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(beat)
    }

    /// Records the database as reachable or not; returns the previous
    /// state. Reachable clears the last error; unreachable keeps the error
    /// given, or the one before it if none is given.
    pub fn set_db_up(&self, up: bool, error: Option<String>) -> bool {
        {
            let mut last = self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if up {
                *last = None;
            } else if let Some(e) = error {
                *last = Some(e);
            }
        }
        self.db_up.swap(up, Ordering::Relaxed)
    }

    pub fn db_up(&self) -> bool {
        self.db_up.load(Ordering::Relaxed)
    }

    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }

    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_ownership(&self, partitions: Vec<i32>, relays: i32) {
        *self
            .ownership
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (partitions, relays);
    }

    /// (owned partitions, relays on the table).
    pub fn ownership(&self) -> (Vec<i32>, i32) {
        self.ownership
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_stuck(&self, stuck: Stuck) {
        *self.stuck.lock().unwrap_or_else(PoisonError::into_inner) = stuck;
    }

    pub fn stuck(&self) -> Stuck {
        *self.stuck.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_slot(&self, slot: SlotState) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(slot);
    }

    pub fn slot(&self) -> Option<SlotState> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_streaming(&self, streaming: bool) {
        self.streaming.store(streaming, Ordering::Relaxed);
    }

    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    pub fn set_polling(&self, polling: bool) {
        self.polling.store(polling, Ordering::Relaxed);
    }

    pub fn polling(&self) -> bool {
        self.polling.load(Ordering::Relaxed)
    }

    /// Records the pause flag as read; returns the previous state.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused.send_replace(paused)
    }

    pub fn paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Wakes on every change of the pause flag.
    pub fn paused_changes(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// Whether `/readyz` may count the source as ready: its database is up
    /// and, for `capture = "wal"`, its slot usable. A paused source stays
    /// ready: pausing is deliberate, and taking the relay out of service
    /// (or restarting it) would not resume it.
    pub fn ready(&self) -> bool {
        self.db_up() && self.slot().is_none_or(|s| s.problem.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovered_database_shows_no_last_error() {
        let h = SourceHealth::new("orders");
        assert!(!h.set_db_up(false, Some("connection refused".into())));
        assert_eq!(h.last_error().as_deref(), Some("connection refused"));
        assert!(!h.set_db_up(true, None));
        assert!(h.db_up());
        assert_eq!(h.last_error(), None, "up again: the old error is over");
    }
}

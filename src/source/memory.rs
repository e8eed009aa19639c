//! An in-memory [`Capture`] for the relay loop's unit tests (beside the
//! scripted publisher in `sink/memory.rs`): rows by id, claimed or not, due
//! or not, and scripted failures. It is `ordering = "none"` only: order
//! per aggregate lives in the claim SQL, which the integration tests check
//! against the real PostgreSQL.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{Capture, Claim, ClaimFrom, Claimed, DbError, FlagSet, Plan, Settled};
use crate::message::OutboxRow;

/// An outbox in memory: rows by id, claimed or not, due or not.
pub struct Row {
    row: OutboxRow,
    due_at: Instant,
    claimed: bool,
}

#[derive(Default)]
pub struct Store {
    rows: BTreeMap<i64, Row>,
    pub parked: Vec<(i64, String)>,
    /// Errors the next claims or settlements fail with.
    pub claim_errors: VecDeque<&'static str>,
    pub settle_errors: VecDeque<&'static str>,
}

pub struct MemoryCapture {
    batch_size: usize,
    store: Mutex<Store>,
    wake: Notify,
    partitions: watch::Sender<Arc<Vec<i32>>>,
    pub claims: AtomicUsize,
    pub sweeps_running: AtomicUsize,
    pub most_sweeps_at_once: AtomicUsize,
    /// Sweeps wait here while it is closed.
    pub sweep_gate: watch::Sender<bool>,
}

fn fail(step: &'static str) -> DbError {
    DbError::Failed {
        step,
        source: "scripted failure".into(),
    }
}

impl MemoryCapture {
    pub fn new(batch_size: usize) -> Arc<Self> {
        Arc::new(Self {
            batch_size,
            store: Mutex::new(Store::default()),
            wake: Notify::new(),
            partitions: watch::Sender::new(Arc::new(Vec::new())),
            claims: AtomicUsize::new(0),
            sweeps_running: AtomicUsize::new(0),
            most_sweeps_at_once: AtomicUsize::new(0),
            sweep_gate: watch::Sender::new(true),
        })
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits rows with these ids, each of an aggregate of its own.
    pub fn insert(&self, ids: impl IntoIterator<Item = i64>) {
        let now = Instant::now();
        let mut store = self.store();
        for id in ids {
            let row = OutboxRow {
                id,
                aggregate_type: "order".into(),
                aggregate_id: format!("o-{id}"),
                event_type: "E".into(),
                payload: "{}".into(),
                headers: String::new(),
                dedup_key: format!("k-{id}"),
                exchange: None,
                routing_key: None,
                created_at: UNIX_EPOCH,
                attempts: 0,
                undecodable: None,
            };
            store.rows.insert(
                id,
                Row {
                    row,
                    due_at: now,
                    claimed: false,
                },
            );
        }
        drop(store);
        self.wake.notify_one();
    }

    pub fn left(&self) -> Vec<i64> {
        self.store().rows.keys().copied().collect()
    }

    pub fn attempts(&self, id: i64) -> Option<i32> {
        self.store().rows.get(&id).map(|r| r.row.attempts)
    }

    pub fn parked(&self) -> Vec<i64> {
        self.store().parked.iter().map(|p| p.0).collect()
    }
}

impl Capture for MemoryCapture {
    /// The claimed ids.
    type Batch = Vec<i64>;

    async fn claim(&self, _from: ClaimFrom) -> Result<Claim<Vec<i64>>, DbError> {
        self.claims.fetch_add(1, AtomicOrdering::SeqCst);
        let now = Instant::now();
        let mut store = self.store();
        if let Some(step) = store.claim_errors.pop_front() {
            return Err(fail(step));
        }
        let mut rows = Vec::new();
        for r in store.rows.values_mut() {
            if rows.len() == self.batch_size {
                break;
            }
            if !r.claimed && r.due_at <= now {
                r.claimed = true;
                rows.push(r.row.clone());
            }
        }
        let report = Claimed {
            rows: rows.len(),
            max_id: rows.last().map_or(0, |r| r.id),
            full: rows.len() == self.batch_size,
            partitions: Vec::new(),
        };
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        Ok(Claim {
            batch: (!rows.is_empty()).then_some(ids),
            rows,
            report,
        })
    }

    async fn can_park(&self, _batch: &Vec<i64>) -> Result<bool, DbError> {
        Ok(true)
    }

    async fn settle(&self, batch: Vec<i64>, plan: &Plan) -> Result<Settled, DbError> {
        let now = Instant::now();
        let mut store = self.store();
        if let Some(step) = store.settle_errors.pop_front() {
            for id in &batch {
                if let Some(r) = store.rows.get_mut(id) {
                    r.claimed = false;
                }
            }
            return Err(fail(step));
        }
        for id in &plan.delivered {
            store.rows.remove(id);
        }
        for (id, _, delay_ms) in &plan.retry {
            if let Some(r) = store.rows.get_mut(id) {
                r.row.attempts += 1;
                r.due_at = now + Duration::from_millis(u64::try_from(*delay_ms).unwrap_or(0));
            }
        }
        for (id, error, _) in &plan.park {
            store.rows.remove(id);
            store.parked.push((*id, error.clone()));
        }
        for id in &batch {
            if let Some(r) = store.rows.get_mut(id) {
                r.claimed = false;
            }
        }
        Ok(Settled {
            parked: plan.park.iter().map(|p| p.0).collect(),
            ..Settled::default()
        })
    }

    async fn give_back(&self, batch: Vec<i64>) -> Result<(), DbError> {
        let mut store = self.store();
        for id in batch {
            if let Some(r) = store.rows.get_mut(&id) {
                r.claimed = false;
            }
        }
        Ok(())
    }

    async fn set_flag(&self, _armed: bool) -> Result<FlagSet, DbError> {
        Ok(FlagSet::Done)
    }

    async fn sweep(&self) -> Result<u64, DbError> {
        let running = self.sweeps_running.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        self.most_sweeps_at_once
            .fetch_max(running, AtomicOrdering::SeqCst);
        let mut gate = self.sweep_gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        self.sweeps_running.fetch_sub(1, AtomicOrdering::SeqCst);
        Ok(0)
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }

    fn partitions(&self) -> watch::Receiver<Arc<Vec<i32>>> {
        self.partitions.subscribe()
    }

    fn upkeep(&self) {}

    fn after_error(&self) {}
}

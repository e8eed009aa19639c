//! The loop and its batches against the scripted publisher
//! (`sink::memory`) and an in-memory capture, on paused time: what the
//! loop promises, whatever PostgreSQL and RabbitMQ do. (That they do what
//! the capture and the publisher say is what the integration tests check,
//! against the real ones.)

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::config::Config;
use crate::message::OutboxRow;
use crate::metrics::Metrics;
use crate::sink::memory::{Answer, MemoryPublisher};
use crate::source::{
    Capture, Claim, ClaimFrom, Claimed, DbError, FlagSet, Plan, Settled, SourceHealth,
};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// An outbox in memory: rows by id, claimed or not, due or not.
struct Row {
    row: OutboxRow,
    due_at: Instant,
    claimed: bool,
}

#[derive(Default)]
struct Store {
    rows: BTreeMap<i64, Row>,
    parked: Vec<(i64, String)>,
    /// Errors the next claims or settlements fail with.
    claim_errors: VecDeque<&'static str>,
    settle_errors: VecDeque<&'static str>,
}

struct MemoryCapture {
    batch_size: usize,
    store: Mutex<Store>,
    wake: Notify,
    partitions: watch::Sender<Arc<Vec<i32>>>,
    claims: AtomicUsize,
    sweeps_running: AtomicUsize,
    most_sweeps_at_once: AtomicUsize,
    /// Sweeps wait here while it is closed.
    sweep_gate: watch::Sender<bool>,
}

fn fail(step: &'static str) -> DbError {
    DbError::Failed {
        step,
        source: "scripted failure".into(),
    }
}

impl MemoryCapture {
    fn new(batch_size: usize) -> Arc<Self> {
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

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits rows with these ids, each of an aggregate of its own.
    fn insert(&self, ids: impl IntoIterator<Item = i64>) {
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

    fn left(&self) -> Vec<i64> {
        self.store().rows.keys().copied().collect()
    }

    fn attempts(&self, id: i64) -> Option<i32> {
        self.store().rows.get(&id).map(|r| r.row.attempts)
    }

    fn parked(&self) -> Vec<i64> {
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

/// A relay on the two fakes, `ordering = "none"`, retries after 1 s.
struct Harness {
    capture: Arc<MemoryCapture>,
    publisher: Arc<MemoryPublisher>,
    relay: Arc<Relay<MemoryCapture, MemoryPublisher>>,
    metrics: Metrics,
}

fn harness(extra: &str) -> Harness {
    harness_with(extra, CONFIRM_TIMEOUT)
}

fn harness_with(extra: &str, confirm_timeout: Duration) -> Harness {
    let text = format!(
        "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"orders\"\n\
         database_url = \"postgres://u@h/db\"\nordering = \"none\"\nbatch_size = 10\n\
         retry_initial = \"1s\"\nretry_max = \"1s\"\n{extra}"
    );
    let mut config = Config::from_toml(&text, &|_| None).expect("test config");
    let cfg = config.sources.remove(0);
    let metrics = Metrics::new();
    let capture = MemoryCapture::new(cfg.batch_size);
    let publisher = Arc::new(MemoryPublisher::new(confirm_timeout));
    let relay = Arc::new(Relay {
        metrics: metrics.source(&cfg.name),
        health: Arc::new(SourceHealth::new(&cfg.name)),
        config: cfg,
        capture: capture.clone(),
        publisher: publisher.clone(),
    });
    Harness {
        capture,
        publisher,
        relay,
        metrics,
    }
}

struct Running {
    drain: CancellationToken,
    abort: CancellationToken,
    handle: JoinHandle<usize>,
}

impl Harness {
    fn start(&self) -> Running {
        let drain = CancellationToken::new();
        let abort = CancellationToken::new();
        let handle = tokio::spawn(self.relay.clone().run(drain.clone(), abort.clone()));
        Running {
            drain,
            abort,
            handle,
        }
    }

    fn metric(&self, series: &str) -> f64 {
        let (text, _) = self.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// Lets (paused) time run until `done` holds, at most `limit` of it.
async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count(ids: &[i64], id: i64) -> usize {
    ids.iter().filter(|i| **i == id).count()
}

#[tokio::test(start_paused = true)]
async fn a_nack_in_the_middle_of_a_batch_retries_that_row_alone() {
    let h = harness("");
    h.publisher.script(3, [Answer::Nack]);
    h.capture.insert(1..=5);
    let running = h.start();
    until("every row delivered", Duration::from_secs(10), || {
        h.capture.left().is_empty()
    })
    .await;
    let sent = h.publisher.sent_ids();
    assert_eq!(count(&sent, 3), 2, "the nacked row went twice: {sent:?}");
    for id in [1, 2, 4, 5] {
        assert_eq!(count(&sent, id), 1, "row {id} went once: {sent:?}");
    }
    assert_eq!(
        h.metric("outboxd_publish_failures_total{reason=\"nacked\",source=\"orders\"}"),
        1.0
    );
    assert_eq!(
        h.metric("outboxd_messages_published_total{source=\"orders\"}"),
        5.0
    );
    running.drain.cancel();
    assert_eq!(running.handle.await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_returned_message_is_never_counted_as_delivered() {
    let h = harness("max_attempts = 2");
    h.publisher.script(1, [Answer::Return, Answer::Return]);
    h.capture.insert([1]);
    let _running = h.start();
    until("the row parked", Duration::from_secs(10), || {
        h.capture.parked() == [1]
    })
    .await;
    assert_eq!(h.publisher.sent_ids(), [1, 1]);
    assert_eq!(
        h.metric("outboxd_messages_published_total{source=\"orders\"}"),
        0.0
    );
    assert_eq!(
        h.metric("outboxd_parked_total{reason=\"returned\",source=\"orders\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_confirm_timeout_retries_every_unconfirmed_row_and_never_parks_it() {
    let h = harness("max_attempts = 1");
    h.publisher
        .script(1, [Answer::Timeout, Answer::Timeout, Answer::Timeout]);
    h.capture.insert([1, 2]);
    let _running = h.start();
    until("row 2 delivered", Duration::from_secs(10), || {
        h.capture.left() == [1]
    })
    .await;
    until(
        "row 1 delivered after three timeouts",
        Duration::from_secs(60),
        || h.capture.left().is_empty(),
    )
    .await;
    assert!(
        h.capture.parked().is_empty(),
        "a timeout is never the row's fault"
    );
    assert_eq!(count(&h.publisher.sent_ids(), 1), 4);
    assert_eq!(
        h.metric("outboxd_publish_failures_total{reason=\"timeout\",source=\"orders\"}"),
        3.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_connection_lost_mid_batch_claims_nothing_until_the_broker_is_back() {
    let h = harness("");
    h.publisher.script(2, [Answer::DropConnection]);
    h.capture.insert(1..=4);
    let _running = h.start();
    until("the connection dropped", Duration::from_secs(10), || {
        !h.publisher.sent_ids().is_empty() && h.capture.attempts(2) == Some(1)
    })
    .await;
    // Rows 2 to 4 are rescheduled; nothing is claimed while the broker is away.
    assert_eq!(h.capture.left(), [2, 3, 4]);
    let claims = h.capture.claims.load(AtomicOrdering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.capture.claims.load(AtomicOrdering::SeqCst), claims);
    assert_eq!(h.publisher.sent_ids(), [1, 2], "3 and 4 never went out");
    h.publisher.set_connected(true);
    until("the rest delivered", Duration::from_secs(10), || {
        h.capture.left().is_empty()
    })
    .await;
    assert_eq!(h.publisher.sent_ids(), [1, 2, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn a_blocked_broker_starts_no_new_batch_until_it_clears() {
    let h = harness("");
    h.publisher.set_blocked(true);
    h.capture.insert(1..=3);
    let _running = h.start();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.capture.claims.load(AtomicOrdering::SeqCst), 0);
    assert!(h.publisher.sent_ids().is_empty());
    h.publisher.set_blocked(false);
    until("every row delivered", Duration::from_secs(10), || {
        h.capture.left().is_empty()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_waits_for_the_batches_in_flight_and_sends_what_is_committed() {
    let h = harness("");
    h.publisher.script(1, [Answer::Block]);
    h.capture.insert([1]);
    let running = h.start();
    until("row 1 in flight", Duration::from_secs(10), || {
        h.publisher.sent_ids() == [1]
    })
    .await;
    // Committed before the signal: the drain sends it too.
    h.capture.insert([2]);
    running.drain.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !running.handle.is_finished(),
        "waits for the batch in flight"
    );
    h.publisher.release();
    assert_eq!(running.handle.await.unwrap(), 0, "nothing abandoned");
    assert!(h.capture.left().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_drain_cut_short_reports_the_rows_it_abandons_and_keeps_them() {
    let h = harness("");
    h.publisher.set_default(Answer::Block);
    h.capture.insert(1..=3);
    let running = h.start();
    until("the batch in flight", Duration::from_secs(10), || {
        h.publisher.sent_ids().len() == 3
    })
    .await;
    running.drain.cancel();
    running.abort.cancel();
    assert_eq!(running.handle.await.unwrap(), 3);
    assert_eq!(h.capture.left(), [1, 2, 3], "the rows stay");
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_does_not_free_the_slot_of_a_running_sweep() {
    // Confirms may take two minutes, so a batch is still in flight when
    // the second sweep (30 s after the first) starts.
    let h = harness_with("", Duration::from_secs(120));
    h.publisher.script(1, [Answer::Block]);
    h.capture.insert([1]);
    let running = h.start();
    until("row 1 in flight", Duration::from_secs(10), || {
        h.publisher.sent_ids() == [1]
    })
    .await;
    // The next sweep starts beside the batch in flight, and holds.
    h.capture.sweep_gate.send_replace(false);
    until("the second sweep running", Duration::from_secs(40), || {
        h.capture.sweeps_running.load(AtomicOrdering::SeqCst) == 1
    })
    .await;
    // Now the batch ends with a database error. Its end frees the batch's
    // slot, never the sweep's: after the pause no claim runs beside the
    // sweep, and no second sweep starts.
    h.capture.store().settle_errors.push_back("settle");
    let claims = h.capture.claims.load(AtomicOrdering::SeqCst);
    h.publisher.release();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        h.capture.claims.load(AtomicOrdering::SeqCst),
        claims,
        "no claim beside a running sweep"
    );
    assert_eq!(
        h.capture.most_sweeps_at_once.load(AtomicOrdering::SeqCst),
        1
    );
    h.capture.sweep_gate.send_replace(true);
    until("row 1 delivered", Duration::from_secs(10), || {
        h.capture.left().is_empty()
    })
    .await;
    running.drain.cancel();
    assert_eq!(running.handle.await.unwrap(), 0);
}

//! The loop and its batches against the scripted publisher
//! (`sink::memory`) and an in-memory capture, on paused time: what the
//! loop promises, whatever PostgreSQL and RabbitMQ do. (That they do what
//! the capture and the publisher say is what the integration tests check,
//! against the real ones.)

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::sink::memory::{Answer, MemoryPublisher};
use crate::source::SourceHealth;
use crate::source::memory::MemoryCapture;

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

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

#[tokio::test(start_paused = true)]
async fn a_paused_source_claims_nothing_until_resumed_and_drains_at_once() {
    let h = harness("");
    h.relay.health.set_paused(true);
    h.capture.insert([1, 2]);
    let running = h.start();
    // Many poll intervals and wake-ups of paused time: not one claim.
    tokio::time::sleep(Duration::from_secs(30)).await;
    h.capture.insert([3]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h.publisher.sent_ids().is_empty(),
        "nothing sent while paused"
    );
    assert_eq!(h.capture.left(), [1, 2, 3], "every row waits");

    h.relay.health.set_paused(false);
    until(
        "every row delivered after resume",
        Duration::from_secs(10),
        || h.capture.left().is_empty(),
    )
    .await;

    // Paused again with a row waiting: a drain ends without claiming it.
    h.relay.health.set_paused(true);
    h.capture.insert([4]);
    running.drain.cancel();
    let abandoned = tokio::time::timeout(Duration::from_secs(5), running.handle)
        .await
        .expect("a paused drain ends at once")
        .unwrap();
    assert_eq!(abandoned, 0);
    assert_eq!(h.capture.left(), [4], "the row stays for after the pause");
    assert!(!h.publisher.sent_ids().contains(&4));
}

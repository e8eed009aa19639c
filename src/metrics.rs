//! Prometheus metrics on our own registry.
//!
//! Names use base units and `_total` on counters; the only labels are
//! `source` and `reason`, never a row id or an exchange a row chose, so the
//! series count is fixed by the config. Every series is created at start
//! (at 0), so dashboards and alerts see it before the first event. The
//! registry has no prefix: `process_*` keeps its standard names.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::outcome::FailureReason;

mod source_error;
pub use source_error::SourceError;

pub const PUBLISHED: &str = "outboxd_messages_published_total";
pub const PUBLISH_FAILURES: &str = "outboxd_publish_failures_total";
pub const PENDING: &str = "outboxd_pending_messages";
pub const OLDEST_PENDING_AGE: &str = "outboxd_oldest_pending_age_seconds";
pub const OLDEST_SENDABLE_AGE: &str = "outboxd_oldest_sendable_age_seconds";
pub const UNCLAIMABLE: &str = "outboxd_unclaimable_rows";
pub const RELAY_LAG: &str = "outboxd_relay_lag_seconds";
pub const BATCH_SIZE: &str = "outboxd_batch_size";
pub const SOURCE_UP: &str = "outboxd_source_up";
pub const PARKED: &str = "outboxd_parked_total";
pub const DEAD_LETTERS: &str = "outboxd_dead_letters";
pub const PARTITIONS_OWNED: &str = "outboxd_partitions_owned";
pub const REBALANCES: &str = "outboxd_rebalances_total";
pub const ORDER_BREAKS: &str = "outboxd_order_breaks_total";
pub const RELAYS: &str = "outboxd_relays";
pub const HELD_ROWS: &str = "outboxd_held_rows";
pub const HELD_BY_DEAD_LETTERS: &str = "outboxd_held_by_dead_letters";
pub const SLOT_RETAINED: &str = "outboxd_slot_retained_bytes";
pub const SLOT_LAG: &str = "outboxd_slot_lag_bytes";
pub const SLOT_ACTIVE: &str = "outboxd_slot_active";
pub const WAL_POLLING: &str = "outboxd_wal_polling";
pub const SOURCE_PAUSED: &str = "outboxd_source_paused";
pub const SOURCE_ERRORS: &str = "outboxd_source_errors_total";
pub const BROKER_UP: &str = "outboxd_broker_up";
pub const BROKER_BLOCKED: &str = "outboxd_broker_blocked";
pub const BROKER_CONNECTS: &str = "outboxd_broker_connections_total";
pub const BUILD_INFO: &str = "outboxd_build_info";

/// The broker connection's series (one connection per process).
#[derive(Clone)]
pub struct BrokerMetrics {
    pub up: IntGauge,
    pub blocked: IntGauge,
    pub connects: IntCounter,
}

pub struct Metrics {
    registry: Registry,
    published: IntCounterVec,
    failures: IntCounterVec,
    pending: IntGaugeVec,
    oldest: GaugeVec,
    oldest_sendable: GaugeVec,
    unclaimable: IntGaugeVec,
    lag: HistogramVec,
    batch: HistogramVec,
    up: IntGaugeVec,
    errors: IntCounterVec,
    parked: IntCounterVec,
    dead: IntGaugeVec,
    owned: IntGaugeVec,
    rebalances: IntCounterVec,
    order_breaks: IntCounterVec,
    relays: IntGaugeVec,
    held: IntGaugeVec,
    held_dead: IntGaugeVec,
    slot_retained: IntGaugeVec,
    slot_lag: IntGaugeVec,
    slot_active: IntGaugeVec,
    wal_polling: IntGaugeVec,
    paused: IntGaugeVec,
    broker: BrokerMetrics,
}

/// A `capture = "wal"` source's replication slot.
#[derive(Clone)]
pub struct SlotMetrics {
    pub retained: IntGauge,
    pub lag: IntGauge,
    pub active: IntGauge,
    pub polling: IntGauge,
}

/// One source's series, looked up once so the hot path only touches atomics.
#[derive(Clone)]
pub struct SourceMetrics {
    pub published: IntCounter,
    /// Indexed by `FailureReason as usize`.
    failures: Vec<IntCounter>,
    pub pending: IntGauge,
    pub oldest_pending_age: Gauge,
    /// Age of the oldest unsent row not held behind an earlier row.
    pub oldest_sendable_age: Gauge,
    /// Rows the relay will never claim (published_at set by someone else).
    pub unclaimable: IntGauge,
    pub lag: Histogram,
    pub batch_size: Histogram,
    pub up: IntGauge,
    /// Indexed by `SourceError as usize`.
    errors: Vec<IntCounter>,
    /// Indexed by `FailureReason as usize`; `None` for reasons that never park.
    parked: Vec<Option<IntCounter>>,
    pub dead_letters: IntGauge,
    /// `ordering = "aggregate"`: partitions this relay owns now.
    pub partitions_owned: IntGauge,
    pub rebalances: IntCounter,
    /// `ordering = "aggregate"`: rows the broker took while an earlier row
    /// of their aggregate in the same batch was refused.
    pub order_breaks: IntCounter,
    /// Relays running on this source's table, this one included.
    pub relays: IntGauge,
    /// Rows marked held, waiting for an earlier row of their aggregate.
    pub held: IntGauge,
    /// Of those, rows waiting for a parked row (`on_park = "hold"`).
    pub held_by_dead_letters: IntGauge,
    /// 1 while an operator has paused the source (`outboxd pause`).
    pub paused: IntGauge,
}

impl SourceMetrics {
    pub fn failure(&self, reason: FailureReason) -> &IntCounter {
        // One entry per reason, in `FailureReason::ALL` order (`Metrics::source`).
        &self.failures[reason as usize]
    }

    /// `None` for a reason that never parks a row.
    pub fn parked(&self, reason: FailureReason) -> Option<&IntCounter> {
        self.parked[reason as usize].as_ref()
    }

    pub fn error(&self, reason: SourceError) -> &IntCounter {
        // One entry per reason, in `SourceError::ALL` order (`Metrics::source`).
        &self.errors[reason as usize]
    }
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    // Names are our own constants, registered once each: a clash is a bug
    // that the unit test below catches.
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique constants");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let labels = &["source"];
        let published = register(&r, IntCounterVec::new(
            Opts::new(PUBLISHED, "Messages confirmed by the broker (plain ack) and removed or marked in the outbox."),
            labels,
        ).expect("valid metric"));
        let failures = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    PUBLISH_FAILURES,
                    "Rows that were not delivered and will be retried, by reason.",
                ),
                &["source", "reason"],
            )
            .expect("valid metric"),
        );
        let pending = register(&r, IntGaugeVec::new(
            Opts::new(PENDING, "Rows in the outbox not yet published (refreshed every metrics.backlog_interval)."),
            labels,
        ).expect("valid metric"));
        let oldest = register(
            &r,
            GaugeVec::new(
                Opts::new(
                    OLDEST_PENDING_AGE,
                    "Age of the oldest unpublished row, 0 when there is none.",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let oldest_sendable = register(
            &r,
            GaugeVec::new(
                Opts::new(
                    OLDEST_SENDABLE_AGE,
                    "Age of the oldest unsent row that no earlier row of its aggregate holds back, 0 when there is none: rows the relay should be moving.",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let unclaimable = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    UNCLAIMABLE,
                    "Rows the relay will never send: published_at set by someone else while after_publish = \"delete\".",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let lag = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    RELAY_LAG,
                    "Time from a row's created_at to the broker's confirm.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
                labels,
            )
            .expect("valid metric"),
        );
        let batch = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(BATCH_SIZE, "Rows per claimed batch.").buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 4000.0,
                    10000.0,
                ]),
                labels,
            )
            .expect("valid metric"),
        );
        let up = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    SOURCE_UP,
                    "1 while the source's database answers, 0 while it does not.",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let errors = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    SOURCE_ERRORS,
                    "Database errors on a source, by where they happened.",
                ),
                &["source", "reason"],
            )
            .expect("valid metric"),
        );
        let parked = register(
            &r,
            IntCounterVec::new(
                Opts::new(PARKED, "Rows moved to the dead-letter table, by reason."),
                &["source", "reason"],
            )
            .expect("valid metric"),
        );
        let dead = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    DEAD_LETTERS,
                    "Rows in the dead-letter table (refreshed with the backlog).",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let gauge = |name: &str, help: &str| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let owned = gauge(
            PARTITIONS_OWNED,
            "ordering = \"aggregate\": partitions of the key space this relay owns.",
        );
        let relays = gauge(
            RELAYS,
            "ordering = \"aggregate\": relays running on the source's table (this one included).",
        );
        let held = gauge(
            HELD_ROWS,
            "Unsent rows marked held: waiting for an earlier row of their aggregate (retrying, parked, or unconfirmed), skipped by claims until it is delivered.",
        );
        let held_dead = gauge(
            HELD_BY_DEAD_LETTERS,
            "Rows waiting behind a parked row of their aggregate (on_park = \"hold\"); replay or purge it to release them.",
        );
        let slot_retained = gauge(
            SLOT_RETAINED,
            "capture = \"wal\": WAL the source's replication slot keeps from removal (current position - restart_lsn).",
        );
        let slot_lag = gauge(
            SLOT_LAG,
            "capture = \"wal\": WAL written since the slot's confirmed position (current position - confirmed_flush_lsn).",
        );
        let slot_active = gauge(
            SLOT_ACTIVE,
            "capture = \"wal\": 1 while a session (this relay or another) streams from the slot, 0 when none does, -1 when the slot is missing or unusable.",
        );
        let wal_polling = gauge(
            WAL_POLLING,
            "capture = \"wal\": 1 while this relay polls the outbox table because the replication slot is missing or lost.",
        );
        let paused = gauge(
            SOURCE_PAUSED,
            "1 while the source is paused (`outboxd pause`): its relays claim nothing and rows accumulate in the outbox; 0 otherwise.",
        );
        let rebalances = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    REBALANCES,
                    "Times this relay's set of partitions changed (relays joined or left).",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let order_breaks = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    ORDER_BREAKS,
                    "Rows the broker took while an earlier row of their aggregate was refused (ordering = \"aggregate\"): a consumer saw them first. They are sent again after it.",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let broker = BrokerMetrics {
            up: register(
                &r,
                IntGauge::new(BROKER_UP, "1 while connected to RabbitMQ.").expect("valid metric"),
            ),
            blocked: register(
                &r,
                IntGauge::new(
                    BROKER_BLOCKED,
                    "1 while RabbitMQ blocks publishing (resource alarm).",
                )
                .expect("valid metric"),
            ),
            connects: register(
                &r,
                IntCounter::new(
                    BROKER_CONNECTS,
                    "Successful connections to RabbitMQ (more than 1 means reconnects).",
                )
                .expect("valid metric"),
            ),
        };
        let build = register(
            &r,
            IntGaugeVec::new(
                Opts::new(BUILD_INFO, "Always 1; the version is in the label."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process metrics are registered once");
        Self {
            registry: r,
            published,
            failures,
            pending,
            oldest,
            oldest_sendable,
            unclaimable,
            lag,
            batch,
            up,
            errors,
            parked,
            dead,
            owned,
            rebalances,
            order_breaks,
            relays,
            held,
            held_dead,
            slot_retained,
            slot_lag,
            slot_active,
            wal_polling,
            paused,
            broker,
        }
    }

    pub fn broker(&self) -> BrokerMetrics {
        self.broker.clone()
    }

    /// The slot series of a `capture = "wal"` source (created only for those).
    pub fn slot(&self, name: &str) -> SlotMetrics {
        let l = &[name];
        SlotMetrics {
            retained: self.slot_retained.with_label_values(l),
            lag: self.slot_lag.with_label_values(l),
            active: self.slot_active.with_label_values(l),
            polling: self.wal_polling.with_label_values(l),
        }
    }

    /// Creates (at 0) and returns the series of one source.
    pub fn source(&self, name: &str) -> SourceMetrics {
        let l = &[name];
        SourceMetrics {
            published: self.published.with_label_values(l),
            failures: FailureReason::ALL
                .iter()
                .map(|r| self.failures.with_label_values(&[name, r.as_str()]))
                .collect(),
            pending: self.pending.with_label_values(l),
            oldest_pending_age: self.oldest.with_label_values(l),
            oldest_sendable_age: self.oldest_sendable.with_label_values(l),
            unclaimable: self.unclaimable.with_label_values(l),
            lag: self.lag.with_label_values(l),
            batch_size: self.batch.with_label_values(l),
            up: self.up.with_label_values(l),
            errors: SourceError::ALL
                .iter()
                .map(|r| self.errors.with_label_values(&[name, r.as_str()]))
                .collect(),
            parked: FailureReason::ALL
                .iter()
                .map(|r| {
                    r.can_park()
                        .then(|| self.parked.with_label_values(&[name, r.as_str()]))
                })
                .collect(),
            dead_letters: self.dead.with_label_values(l),
            partitions_owned: self.owned.with_label_values(l),
            rebalances: self.rebalances.with_label_values(l),
            order_breaks: self.order_breaks.with_label_values(l),
            relays: self.relays.with_label_values(l),
            held: self.held.with_label_values(l),
            held_by_dead_letters: self.held_dead.with_label_values(l),
            paused: self.paused.with_label_values(l),
        }
    }

    /// The text exposition format and its content type.
    pub fn render(&self) -> (String, String) {
        let encoder = TextEncoder::new();
        let mut out = String::new();
        if let Err(err) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            out = format!("# encoding failed: {err}\n");
        }
        (out, encoder.format_type().to_owned())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;

//! A claimed batch waits for the broker in an open transaction (its row
//! locks are the claim). While it waits it must hold no snapshot: an xmin
//! there keeps every row deleted since from being dead to all, so the
//! index entries of the rows other batches settle meanwhile cannot be
//! marked dead by the walks that pass them, and each was read from the
//! table by two walks instead of one (the walk's unnamed portal kept its
//! snapshot until the batch's next statement, measured in a drain: every
//! batch idle with the other's xid as its xmin).

use std::sync::Arc;
use std::time::Duration;

use outboxd::config::{Config, Ordering};
use outboxd::metrics::Metrics;
use outboxd::source::capture::Capture;
use outboxd::source::health::SourceHealth;
use outboxd::source::order::PARTITIONS;
use outboxd::source::{ClaimFrom, Source, pool};

use crate::support::db::TestDb;
use crate::support::relay::simple_config;

#[tokio::test]
async fn an_unordered_batch_waits_without_a_snapshot() {
    waits_without_a_snapshot("obx_idle_none", Ordering::None, ClaimFrom::After(0)).await;
}

#[tokio::test]
async fn an_ordered_batch_waits_without_a_snapshot() {
    waits_without_a_snapshot("obx_idle_aggregate", Ordering::Aggregate, every()).await;
}

#[tokio::test]
async fn a_strict_batch_waits_without_a_snapshot() {
    waits_without_a_snapshot("obx_idle_strict", Ordering::AggregateStrict, every()).await;
}

/// An ordered claim over every partition, nothing in flight.
fn every() -> ClaimFrom {
    ClaimFrom::Partitions {
        free: (0..PARTITIONS).collect(),
        most: PARTITIONS.into(),
        share: 1,
        probe: false,
    }
}

async fn waits_without_a_snapshot(name: &str, ordering: Ordering, from: ClaimFrom) {
    let db = TestDb::migrated(name).await;
    db.client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'a-' || (g % 10), 'Step', '{}' FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    let mut config = Config::from_toml(&simple_config(&db.url, "unused"), &|_| None)
        .expect("the test config is valid");
    let mut source_config = config.sources.remove(0);
    source_config.ordering = ordering;
    let pool = pool::build(&source_config, Duration::from_secs(10)).expect("a pool");
    let metrics = Metrics::new().source(&source_config.name);
    let health = Arc::new(SourceHealth::new(&source_config.name));
    let source = Source::new(source_config, pool, metrics, health);

    let claim = source.claim(from).await.expect("the claim runs");
    assert!(!claim.rows.is_empty(), "the claim found the rows");
    let batch = claim.batch.expect("a batch with rows stays open");
    // Read from another session: any statement on the batch's connection
    // would take the walk's place in the unnamed portal itself.
    let sessions = db
        .client
        .query(
            "SELECT backend_xmin::text FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND state = 'idle in transaction' AND backend_xid IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    let xmins: Vec<Option<String>> = sessions.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        xmins,
        vec![None],
        "one batch, its rows locked in an open transaction, and no snapshot held"
    );
    batch.rollback().await.unwrap();
}

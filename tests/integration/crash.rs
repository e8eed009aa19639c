//! kill -9 at any moment loses nothing: the row locks die with the
//! connection, the rows are claimed again, and the only duplicates are what
//! was in flight.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, simple_config};
use crate::support::{IN_FLIGHT, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_flow_then_restart_publishes_every_committed_row() {
    const ROWS: usize = 20_000;
    let db = TestDb::migrated("obx_crash").await;
    let keys = db.insert_rows(ROWS, 100).await;
    let mut broker = TestBroker::new("#").await;
    let cfg = simple_config(&db.url, &broker.exchange);

    let mut relay = Relay::start(&cfg).await;
    eventually(
        "some rows to be published",
        Duration::from_secs(60),
        || async {
            let n = relay
                .metric("outboxd_messages_published_total{source=\"orders\"}")
                .await
                .unwrap_or(0.0);
            (n >= 2000.0).then_some(())
        },
    )
    .await;
    relay.kill9();
    let left = db.count().await;
    assert!(left > 0, "the kill came before the end ({left} rows left)");

    let _relay = Relay::start(&cfg).await;
    eventually("an empty table", Duration::from_secs(120), || async {
        (db.count().await == 0).then_some(())
    })
    .await;

    let got = broker.collect(ROWS * 2, Duration::from_secs(3)).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &got {
        *seen
            .entry(m.message_id.clone().expect("message_id"))
            .or_default() += 1;
    }
    let missing: Vec<&String> = keys.iter().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} rows never arrived, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let duplicates = got.len() - seen.len();
    println!(
        "kill -9 after >=2000 published, {left} rows left: {} messages for {ROWS} rows, {duplicates} duplicates",
        got.len()
    );
    // In flight at most max_in_flight batches of batch_size (the defaults).
    assert!(
        duplicates <= IN_FLIGHT,
        "duplicates {duplicates} exceed what can be in flight"
    );
}

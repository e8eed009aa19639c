//! Repeated kill -9 during a 50k-row flow: every row arrives at least once.

use crate::support::db::TestDb;
use crate::support::relay::{Relay, simple_config};
use crate::support::{IN_FLIGHT, eventually};
use crate::{DurableQueue, LONG, all_arrived};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill_9_during_a_flow_loses_nothing() {
    const ROWS: usize = 50_000;
    const KILLS: usize = 3;
    let db = TestDb::migrated("obx_kill9").await;
    let q = DurableQueue::new().await;
    let keys = db.insert_rows(ROWS, 100).await;
    let cfg = simple_config(&db.url, &q.exchange);
    let mut left = ROWS as i64;
    for kill in 0..KILLS {
        let mut relay = Relay::start(&cfg).await;
        // A random moment: after a random share (5-25%) of what is left went out.
        let share = 0.05 + 0.2 * fastrand::f64();
        let target = left - ((left as f64) * share) as i64;
        eventually("rows to flow", LONG, || async {
            (db.count().await <= target).then_some(())
        })
        .await;
        relay.kill9();
        left = db.count().await;
        println!("kill {} of {KILLS}: {left} rows left", kill + 1);
        assert!(left > 0, "the kill came before the end");
    }
    let _relay = Relay::start(&cfg).await;
    eventually("an empty table", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let seen = q.drain().await;
    let duplicates = all_arrived(&keys, &seen);
    println!("{KILLS} kill -9 during {ROWS} rows: all arrived, {duplicates} duplicates");
    // Each kill can duplicate at most what was in flight: max_in_flight x batch_size.
    assert!(duplicates <= KILLS * IN_FLIGHT, "{duplicates} duplicates");
}

//! A broker resource alarm: publishing blocks; the relay exports the
//! blocked state, loses nothing, and resumes when the alarm clears.

use std::time::Duration;

use crate::support::db::TestDb;
use crate::support::relay::{Relay, simple_config};
use crate::support::{IN_FLIGHT, eventually};
use crate::{DurableQueue, LONG, all_arrived, service};

/// Puts the memory watermark back even if the test fails half-way.
struct WatermarkGuard;
impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishing_then_everything_arrives() {
    let db = TestDb::migrated("obx_alarm").await;
    let q = DurableQueue::new().await;
    let relay = Relay::start(&simple_config(&db.url, &q.exchange)).await;
    // Publish once, so the broker treats the relay as a publisher.
    let mut keys = db.insert_rows(10, 10).await;
    eventually("the first rows to go out", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;

    let guard = WatermarkGuard;
    service("rabbitmqctl", &["set_vm_memory_high_watermark", "0.0001"]);
    keys.extend(db.insert_rows(2000, 100).await);
    relay.wait_metric("outboxd_broker_blocked", 1.0, LONG).await;
    // While blocked nothing is confirmed, so nothing leaves the table.
    let during = db.count().await;
    assert!(during > 0, "rows wait while the broker is blocked");
    println!("blocked: {during} rows waiting");
    // Hold the alarm a while (the scenario, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    service("rabbitmqctl", &["set_vm_memory_high_watermark", "0.4"]);
    drop(guard);

    relay.wait_metric("outboxd_broker_blocked", 0.0, LONG).await;
    eventually("an empty table", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let seen = q.drain().await;
    let duplicates = all_arrived(&keys, &seen);
    println!(
        "memory alarm 3 s: {} rows all arrived, {duplicates} duplicates",
        keys.len()
    );
    // At most what was in flight when it blocked (max_in_flight ×
    // batch_size, the defaults) can be sent twice.
    assert!(
        duplicates <= IN_FLIGHT,
        "duplicates {duplicates} exceed what can be in flight"
    );
}

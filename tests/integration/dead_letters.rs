//! The operator's side of parking: list, replay (same id and dedup key,
//! attempts reset, delivered once the cause is fixed) and purge (only with
//! --yes).

use std::time::Duration;

use crate::failures::parked;
use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_rows_can_be_listed_replayed_and_purged() {
    let db = TestDb::migrated("obx_dlq").await;
    let mut broker = TestBroker::new("order.#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("max_attempts", "2")],
    );
    let _relay = Relay::start(&cfg).await;
    let first = db
        .insert_one("X", "routing_key, dedup_key", "'nowhere', 'dk-first'")
        .await;
    let second = db.insert_one("Y", "routing_key", "'nowhere.too'").await;
    parked(&db, first).await;
    parked(&db, second).await;

    let (code, out, err) = run_to_end(&["dead-letters", "list"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!(" {first} ")))
        .unwrap_or_else(|| panic!("row {first} listed: {out}"));
    assert!(
        line.starts_with("orders") && line.contains("returned") && line.contains("NO_ROUTE"),
        "{line}"
    );

    // Purge refuses without --yes and changes nothing.
    let (code, _, err) = run_to_end(
        &[
            "dead-letters",
            "purge",
            "--source",
            "orders",
            "--id",
            &second.to_string(),
        ],
        &cfg,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--yes"), "{err}");
    parked(&db, second).await;

    // An unknown source is an error naming it.
    let (code, _, err) = run_to_end(
        &["dead-letters", "replay", "--source", "nope", "--all"],
        &cfg,
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("\"nope\""), "{err}");

    // Fix the cause, then replay: same id and dedup key, attempts reset.
    broker.bind("nowhere").await;
    let (code, out, err) = run_to_end(
        &[
            "dead-letters",
            "replay",
            "--source",
            "orders",
            "--id",
            &first.to_string(),
        ],
        &cfg,
    );
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("replayed 1 row"), "{out}");
    let m = broker
        .next(WAIT)
        .await
        .expect("the replayed row is delivered");
    assert_eq!(m.message_id.as_deref(), Some("dk-first"));
    eventually("the replayed row to leave the outbox", WAIT, || async {
        db.row_state(first).await.is_none().then_some(())
    })
    .await;

    // Purge with --yes deletes for good.
    let (code, out, err) = run_to_end(
        &[
            "dead-letters",
            "purge",
            "--source",
            "orders",
            "--all",
            "--yes",
        ],
        &cfg,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 1"), "{out}");
    let left = db.dead_count().await;
    assert_eq!(left, 0);
}

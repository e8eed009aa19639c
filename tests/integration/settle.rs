//! Rows the database will not settle as planned (issue "hardening",
//! finding 4): a park that overflows `attempts`, a dead letter with the
//! same id, a column that cannot be read, a DELETE the relay may not run.
//! Each is settled on its own or rescheduled with backoff; none undoes its
//! batch or floods the source with duplicates.

use std::time::Duration;

use crate::failures::parked;
use crate::stuck::{duplicates, good_rows, outbox_id, receive_all};
use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, simple_config};
use crate::support::{AMQP_URL, eventually, unique};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_park_overflows_attempts_does_not_undo_its_batch() {
    let db = TestDb::migrated("obx_overflow").await;
    let mut broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    let mut client = db.connect().await;
    let tx = client.transaction().await.unwrap();
    let bad: i64 = tx
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers, attempts) \
             VALUES ('x', 'max', 'E', '{}', '[1]', 2147483647) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    let keys = good_rows(&db, "after-max", 500).await;
    let seen = receive_all(&mut broker, &keys).await;
    assert_eq!(duplicates(&seen), 0, "no batch was undone and resent");
    let (reason, _, attempts) = parked(&db, bad).await;
    assert_eq!((reason.as_str(), attempts), ("bad_row", i32::MAX));
    relay
        .wait_metric("outboxd_dead_letters{source=\"orders\"}", 1.0, WAIT)
        .await;
    assert_eq!(
        relay
            .metric("outboxd_parked_total{reason=\"bad_row\",source=\"orders\"}")
            .await,
        Some(1.0),
        "a park is counted once, when it committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_that_cannot_be_parked_is_rescheduled_and_the_rest_is_not_resent() {
    let db = TestDb::migrated("obx_dupdead").await;
    let mut broker = TestBroker::new("#").await;
    // A dead letter already holds id 1000000 (the outbox was restarted
    // with RESTART IDENTITY, say), and a new bad row gets the same id.
    db.client
        .batch_execute(
            "INSERT INTO outbox_dead (id, aggregate_type, aggregate_id, event_type, payload, headers, \
               dedup_key, created_at, attempts, last_error, reason) \
             VALUES (1000000, 'old', 'old', 'Old', '{}', '{}', 'old-key', now(), 1, 'old', 'bad_row'); \
             INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES (1000000, 'x', 'dup', 'E', '{}', '[1]');",
        )
        .await
        .unwrap();
    let keys = good_rows(&db, "after-dup", 500).await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    let seen = receive_all(&mut broker, &keys).await;
    assert_eq!(duplicates(&seen), 0, "no batch was undone and resent");
    let (attempts, error) = eventually("the bad row rescheduled", WAIT, || async {
        match db.row_state(1_000_000).await {
            Some((attempts, Some(error), false)) if attempts >= 1 => Some((attempts, error)),
            _ => None,
        }
    })
    .await;
    assert!(error.contains("cannot be parked"), "{error}");
    assert!(error.contains("headers must be a JSON object"), "{error}");
    assert!(attempts >= 1);
    let old: String = db
        .client
        .query_one("SELECT dedup_key FROM outbox_dead WHERE id = 1000000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(old, "old-key", "the earlier dead letter is untouched");
    let logged: Vec<i64> = relay
        .log_lines_with("refused to settle")
        .iter()
        .filter_map(|l| l["row_id"].as_i64())
        .collect();
    assert!(logged.contains(&1_000_000), "a log line names the row");
    assert!(
        relay
            .metric("outboxd_source_errors_total{reason=\"settle\",source=\"orders\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_an_unreadable_column_is_a_bad_row_named_by_its_id() {
    let db = TestDb::migrated("obx_nullcol").await;
    let mut broker = TestBroker::new("#").await;
    db.client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN created_at DROP NOT NULL")
        .await
        .unwrap();
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    let null = db.insert_one("E", "created_at", "NULL").await;
    let keys = good_rows(&db, "after-null", 500).await;
    let seen = receive_all(&mut broker, &keys).await;
    assert_eq!(duplicates(&seen), 0, "no batch was undone and resent");
    let (reason, error, _) = parked(&db, null).await;
    assert_eq!(reason, "bad_row", "{error}");
    assert!(error.contains("created_at"), "{error}");
    let logged: Vec<i64> = relay
        .log_lines_with("row parked")
        .iter()
        .filter_map(|l| l["row_id"].as_i64())
        .collect();
    assert!(
        logged.contains(&null),
        "a log line names the row: {logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_rows_the_relay_may_not_delete_back_off_instead_of_flooding() {
    let db = TestDb::migrated("obx_nodelete").await;
    let mut broker = TestBroker::new("#").await;
    let role = unique("obx_nodel");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER; REVOKE ALL ON outbox FROM PUBLIC; \
             GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT, UPDATE ON outbox TO {role}; \
             GRANT UPDATE ON outbox_wakeup TO {role}; \
             GRANT SELECT, INSERT ON outbox_dead TO {role};"
        ))
        .await
        .unwrap();
    let url = format!("postgres://{role}@127.0.0.1:5432/{}", db.name);
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &url, &broker.exchange)
            .set("retry_initial", "\"1s\"")
            .set("retry_max", "\"30s\"")],
    );
    let relay = Relay::start(&cfg).await;
    let id = db.insert_one("E", "", "").await;
    // Over six seconds: sent at 0, then after about 1 s and 2 s (backoff
    // grows); before, it went out every 250 ms (about 24 times).
    let started = std::time::Instant::now();
    let mut sends = 0;
    while started.elapsed() < Duration::from_secs(6) {
        if let Some(m) = broker.next(Duration::from_millis(200)).await {
            assert_eq!(outbox_id(&m), Some(id));
            sends += 1;
        }
    }
    let state = db.row_state(id).await;
    db.client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
    assert!((1..=5).contains(&sends), "sent {sends} times in 6 s");
    let (attempts, error, _) = state.expect("the row stays");
    assert!(attempts >= 1, "attempts {attempts}");
    let error = error.unwrap_or_default();
    assert!(error.contains("refused to remove"), "{error}");
    assert!(
        !relay.log_lines_with("refused to settle").is_empty(),
        "logged with the row id"
    );
}

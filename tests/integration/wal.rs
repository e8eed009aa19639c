//! `capture = "wal"`: rows and `outbox_emit()` messages read from the
//! write-ahead log through the source's own replication slot, in commit
//! order; the slot moves only past what the broker confirmed.
//! (Needs wal_level = logical: scripts/services.sh sets it.)

use std::time::Duration;

use crate::support::broker::{Received, TestBroker};
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// A database with the outbox, its publication and slot (made by
/// `outboxd migrate`), and the config of one wal source on it. The source
/// is named after the database, so the slot (`outboxd_<name>`) is unique.
async fn wal_source(prefix: &str, exchange: &str) -> (TestDb, String) {
    let db = TestDb::empty(prefix).await;
    let cfg = config(AMQP_URL, &[spec(&db, exchange)]);
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "migrate: {err}");
    (db, cfg)
}

fn spec(db: &TestDb, exchange: &str) -> SourceSpec {
    SourceSpec::new(&db.name, &db.url, exchange).set("capture", "\"wal\"")
}

fn slot(db: &TestDb) -> String {
    format!("outboxd_{}", db.name)
}

async fn insert(db: &TestDb, aggregate: &str, event: &str) -> i64 {
    db.client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', $1, $2, '{}') RETURNING id",
            &[&aggregate, &event],
        )
        .await
        .expect("insert")
        .get(0)
}

fn kinds(messages: &[Received]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m.kind.clone().unwrap_or_default())
        .collect()
}

/// The slot's confirmed position and the server's current one, in bytes.
async fn slot_position(db: &TestDb) -> (i64, i64) {
    let row = db
        .client
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot(db)],
        )
        .await
        .expect("the slot exists");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_makes_the_publication_the_slot_and_outbox_emit_and_is_idempotent() {
    let mut broker_name = crate::support::unique("obxw_ex");
    broker_name.truncate(60);
    let (db, cfg) = wal_source("obxw_mig", &broker_name).await;
    let slot_row = db
        .client
        .query_one(
            "SELECT plugin, temporary FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot(&db)],
        )
        .await
        .expect("slot made by migrate");
    assert_eq!(slot_row.get::<_, String>(0), "pgoutput");
    assert!(!slot_row.get::<_, bool>(1), "never a temporary slot");
    let published: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_publication p JOIN pg_publication_tables t USING (pubname) \
             WHERE p.pubname = $1 AND t.tablename = 'outbox' AND p.pubinsert AND NOT p.pubupdate AND NOT p.pubdelete",
            &[&slot(&db)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1, "the outbox's inserts, nothing else");
    let public_may_emit: bool = db
        .client
        .query_one(
            "SELECT has_function_privilege('public', 'pg_logical_emit_message(boolean,text,text)', 'EXECUTE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !public_may_emit,
        "migrate (as a superuser) revokes it from PUBLIC"
    );
    let triggers: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        triggers, 0,
        "producers pay no NOTIFY trigger with capture = wal"
    );
    // Again: nothing changes, nothing fails.
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "second migrate: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_first_then_commit_order_rollbacks_never_and_emitted_messages_too() {
    let mut broker = TestBroker::new("#").await;
    let (db, cfg) = wal_source("obxw_order", &broker.exchange).await;
    // Rows already in the table before the relay starts (a backlog).
    insert(&db, "a", "Pre1").await;
    insert(&db, "b", "Pre2").await;
    let relay = Relay::start(&cfg).await;
    let first = broker.collect(2, WAIT).await;
    assert_eq!(kinds(&first), ["Pre1", "Pre2"]);

    // T1 inserts first but commits last: the log's order is commit order.
    let t1 = db.connect().await;
    t1.batch_execute("BEGIN").await.unwrap();
    t1.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'c', 'CommitsLast', '{}')",
        &[],
    )
    .await
    .unwrap();
    insert(&db, "d", "CommitsFirst").await;
    // A rolled-back row never goes out.
    let t2 = db.connect().await;
    t2.batch_execute(
        "BEGIN; INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'x', 'RolledBack', '{}'); ROLLBACK",
    )
    .await
    .unwrap();
    t1.batch_execute("COMMIT").await.unwrap();
    // A message with no row, with and without a dedup key.
    db.client
        .batch_execute(
            "SELECT outbox_emit('order', 'e', 'Emitted', '{\"n\": 1}', '{\"h\": \"v\"}', 'my-key'); \
             SELECT outbox_emit('order', 'e', 'EmittedNoKey', '[]')",
        )
        .await
        .unwrap();
    let rest = broker.collect(4, WAIT).await;
    assert_eq!(
        kinds(&rest),
        ["CommitsFirst", "CommitsLast", "Emitted", "EmittedNoKey"]
    );
    assert!(
        broker.next(Duration::from_millis(500)).await.is_none(),
        "nothing else (the rolled-back row never)"
    );
    let emitted = &rest[2];
    assert_eq!(emitted.message_id.as_deref(), Some("my-key"));
    assert_eq!(emitted.json(), serde_json::json!({"n": 1}));
    assert_eq!(emitted.header_str("h").as_deref(), Some("v"));
    assert_eq!(emitted.header_str("x-aggregate-id").as_deref(), Some("e"));
    // Without a key: <commit lsn>-<ordinal>, so a redelivery has the same id.
    let derived = rest[3].message_id.clone().unwrap_or_default();
    let (lsn, ordinal) = derived.rsplit_once('-').expect("lsn-ordinal");
    assert!(lsn.contains('/'), "{derived}");
    // Both calls ran in one transaction (one simple query): ordinals 0 and 1.
    assert_eq!(ordinal, "1");
    // Table rows go once confirmed; the slot follows.
    eventually("the table to empty", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let (confirmed, _) = slot_position(&db).await;
    assert!(confirmed > 0);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_resumes_at_the_slot_without_repeating_anything() {
    let mut broker = TestBroker::new("#").await;
    let (db, cfg) = wal_source("obxw_resume", &broker.exchange).await;
    let mut relay = Relay::start(&cfg).await;
    for i in 0..20 {
        insert(&db, &format!("a{}", i % 4), &format!("First{i}")).await;
    }
    assert_eq!(broker.collect(20, WAIT).await.len(), 20);
    relay.signal("-TERM");
    let status = relay.wait_exit(WAIT).await.expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // While it is stopped, more is committed.
    for i in 0..10 {
        insert(&db, "b", &format!("Second{i}")).await;
    }
    let _relay = Relay::start(&cfg).await;
    let got = broker.collect(10, WAIT).await;
    let want: Vec<String> = (0..10).map(|i| format!("Second{i}")).collect();
    assert_eq!(
        kinds(&got),
        want,
        "exactly what came after the stop, in order"
    );
    assert!(
        broker.next(Duration::from_millis(700)).await.is_none(),
        "nothing sent twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_follows_the_server_and_pins_no_wal() {
    let broker = TestBroker::new("#").await;
    let (db, cfg) = wal_source("obxw_idle", &broker.exchange).await;
    let relay = Relay::start(&cfg).await;
    relay.wait_ready(200, WAIT).await;
    // WAL the publication does not carry: nothing for the relay to send,
    // but the slot must not hold it.
    db.client
        .batch_execute(
            "CREATE TABLE other (x text); INSERT INTO other SELECT repeat('y', 500) FROM generate_series(1, 20000)",
        )
        .await
        .unwrap();
    let (_, written) = slot_position(&db).await;
    eventually("the slot to pass the unrelated WAL", WAIT, || async {
        let (confirmed, _) = slot_position(&db).await;
        (confirmed >= written).then_some(())
    })
    .await;
    eventually("outboxd_slot_active 1", WAIT, || async {
        let active = relay
            .metric(&format!("outboxd_slot_active{{source=\"{}\"}}", db.name))
            .await;
        (active == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_stands_by_and_takes_over_when_the_first_is_killed() {
    let mut broker = TestBroker::new("#").await;
    let (db, cfg) = wal_source("obxw_standby", &broker.exchange).await;
    let mut first = Relay::start(&cfg).await;
    eventually("the first relay to stream", WAIT, || async {
        let (_, body) = first.readyz().await;
        (body["sources"][0]["wal"]["streaming_here"] == true).then_some(())
    })
    .await;
    let second = Relay::start(&cfg).await;
    eventually("the second relay to stand by", WAIT, || async {
        (!second.log_lines_with("standing by to take over").is_empty()).then_some(())
    })
    .await;
    for i in 0..5 {
        insert(&db, "a", &format!("Before{i}")).await;
    }
    assert_eq!(broker.collect(5, WAIT).await.len(), 5);
    first.kill9();
    for i in 0..5 {
        insert(&db, "a", &format!("After{i}")).await;
    }
    let got = broker.collect(5, WAIT).await;
    // After a kill -9, what the first relay had not acknowledged to the
    // slot may come again: drop duplicates by message_id, as consumers do.
    let mut seen = std::collections::HashSet::new();
    let fresh: Vec<String> = got
        .iter()
        .filter(|m| seen.insert(m.message_id.clone()))
        .filter_map(|m| m.kind.clone())
        .filter(|k| k.starts_with("After"))
        .collect();
    let mut rest = Vec::new();
    if fresh.len() < 5 {
        rest = broker.collect(10, Duration::from_secs(5)).await;
    }
    let mut all: Vec<String> = fresh;
    for m in &rest {
        if seen.insert(m.message_id.clone())
            && let Some(k) = &m.kind
            && k.starts_with("After")
        {
            all.push(k.clone());
        }
    }
    let want: Vec<String> = (0..5).map(|i| format!("After{i}")).collect();
    assert_eq!(all, want, "the second relay took over, in order");
    assert!(!second.log_lines_with("took over the slot").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_makes_the_source_unready_and_the_table_is_polled_until_it_is_back() {
    let mut broker = TestBroker::new("#").await;
    let (db, cfg) = wal_source("obxw_dropped", &broker.exchange).await;
    let relay = Relay::start(&cfg).await;
    relay.wait_ready(200, WAIT).await;
    // Drop it under the relay: end its walsender (waiting for it to go),
    // then drop the slot, until the drop wins the race with the relay's
    // reconnect.
    let s = slot(&db);
    eventually("the slot to be dropped", WAIT, || async {
        db.client
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
                   WHERE slot_name = '{s}' AND active_pid IS NOT NULL; \
                 SELECT pg_drop_replication_slot('{s}')"
            ))
            .await
            .ok()
    })
    .await;
    eventually("/readyz to name the missing slot", WAIT, || async {
        let (code, body) = relay.readyz().await;
        let problem = body["sources"][0]["wal"]["problem"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (code == 503 && problem.starts_with("missing")).then_some(())
    })
    .await;
    eventually("the slot error to be counted", WAIT, || async {
        let n = relay
            .metric(&format!(
                "outboxd_source_errors_total{{reason=\"replication\",source=\"{}\"}}",
                db.name
            ))
            .await
            .unwrap_or(0.0);
        (n >= 1.0).then_some(())
    })
    .await;
    // Meanwhile the table is polled: rows committed now still go out.
    let polling = format!("outboxd_wal_polling{{source=\"{}\"}}", db.name);
    relay.wait_metric(&polling, 1.0, WAIT).await;
    for i in 0..3 {
        insert(&db, "a", &format!("WhileGone{i}")).await;
    }
    let got = broker.collect(3, WAIT).await;
    assert_eq!(kinds(&got), ["WhileGone0", "WhileGone1", "WhileGone2"]);
    let (_, body) = relay.readyz().await;
    assert_eq!(body["sources"][0]["wal"]["polling_table"], true, "{body}");
    // migrate makes it again, and the relay streams from it on its own.
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    relay.wait_ready(200, WAIT).await;
    relay.wait_metric(&polling, 0.0, WAIT).await;
    insert(&db, "a", "Streamed").await;
    let got = broker.collect(1, WAIT).await;
    assert_eq!(kinds(&got), ["Streamed"]);
    assert!(
        broker.next(Duration::from_millis(500)).await.is_none(),
        "nothing sent twice"
    );
    eventually("the table to empty", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_wal_setup_and_slot_drop_asks_for_yes() {
    let broker = TestBroker::new("#").await;
    let (db, cfg) = wal_source("obxw_check", &broker.exchange).await;
    let (code, out, err) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(0), "{out}{err}");
    for line in [
        "wal_level: logical",
        "trigger: not needed with capture = \"wal\"",
        "replication role: \"root\" is a superuser",
        &format!(
            "publication: \"{}\" publishes the inserts of public.outbox",
            slot(&db)
        ),
        &format!("slot: \"{}\" (pgoutput", slot(&db)),
        "max_slot_wal_keep_size",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }

    let source = db.name.clone();
    let (code, _, err) = run_to_end(&["slot", "drop", "--source", &source], &cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("would drop slot") && err.contains("--yes"),
        "{err}"
    );
    let (code, out, err) = run_to_end(&["slot", "drop", "--source", &source, "--yes"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("dropped slot"), "{out}");
    let left: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot(&db)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // Now check fails, naming the slot and what to do.
    let (code, out, _) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("does not exist; run `outboxd migrate`"),
        "{out}"
    );
}

/// Batches overlap on the wal relay's one channel (the next is written
/// while the broker confirms the one before), and lapin hands a returned
/// message to whichever confirm of the channel it resolves next, which may
/// be one of the later batch. However the acks fall, exactly the
/// unroutable rows and `outbox_emit()` messages are parked, every routable
/// one arrives, and each aggregate's first deliveries are in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batches_overlapping_exactly_the_unroutable_messages_are_parked() {
    const TXNS: i64 = 12;
    const PER_TXN: i64 = 250;
    let mut broker = TestBroker::new("order.#").await;
    let db = TestDb::empty("obxw_lane").await;
    let cfg = config(
        AMQP_URL,
        &[spec(&db, &broker.exchange)
            .set("max_attempts", "1")
            .set("batch_size", "40")],
    );
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "migrate: {err}");
    let relay = Relay::start(&cfg).await;
    eventually("the slot streaming", WAIT, || async {
        let active = relay
            .metric(&format!("outboxd_slot_active{{source=\"{}\"}}", db.name))
            .await;
        (active == Some(1.0)).then_some(())
    })
    .await;
    // Per transaction: table rows, every 37th unroutable (its routing key
    // column), then emitted messages, every 41st unroutable (aggregate
    // type `lost`, so routing key `lost.E`). Ten aggregates, seq in order.
    for t in 0..TXNS {
        let (from, to) = (t * PER_TXN, (t + 1) * PER_TXN - 1);
        db.client
            .batch_execute(&format!(
                "BEGIN; \
                 INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, dedup_key, routing_key) \
                   SELECT 'order', 'a' || (g % 10), 'E', jsonb_build_object('seq', g), 'r-' || g, \
                          CASE WHEN g % 37 = 0 THEN 'nowhere.x' END \
                   FROM generate_series({from}, {to}) g ORDER BY g; \
                 SELECT count(outbox_emit(CASE WHEN g % 41 = 0 THEN 'lost' ELSE 'order' END, 'a' || (g % 10), 'E', \
                          jsonb_build_object('seq', g + 1000000), '{{}}', 'm-' || g)) \
                   FROM (SELECT g FROM generate_series({from}, {to}) g ORDER BY g) s; \
                 COMMIT"
            ))
            .await
            .expect("a producer transaction");
    }
    let all = TXNS * PER_TXN;
    let bad_rows: Vec<String> = (0..all)
        .filter(|g| g % 37 == 0)
        .map(|g| format!("r-{g}"))
        .collect();
    let bad_messages: Vec<String> = (0..all)
        .filter(|g| g % 41 == 0)
        .map(|g| format!("m-{g}"))
        .collect();
    let good = 2 * all as usize - bad_rows.len() - bad_messages.len();
    eventually("every unroutable message parked", WAIT * 2, || async {
        let n = db.dead_count().await;
        (n as usize >= bad_rows.len() + bad_messages.len()).then_some(())
    })
    .await;
    eventually("the table to empty", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let mut parked: Vec<String> = db
        .client
        .query("SELECT dedup_key, reason FROM outbox_dead ORDER BY id", &[])
        .await
        .expect("dead letters")
        .iter()
        .map(|r| {
            assert_eq!(r.get::<_, String>(1), "returned");
            r.get(0)
        })
        .collect();
    parked.sort();
    let mut expected: Vec<String> = bad_rows.iter().chain(&bad_messages).cloned().collect();
    expected.sort();
    assert_eq!(parked, expected, "exactly the unroutable ones are parked");
    // Every routable message arrived; duplicates (messages after a failed
    // one go again) are dropped by message_id, and what is left of each
    // aggregate is in order.
    let mut seen = std::collections::HashSet::new();
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    let mut duplicates = 0;
    while seen.len() < good {
        let m = broker
            .next(WAIT)
            .await
            .unwrap_or_else(|| panic!("{} of {good} routable messages came", seen.len()));
        let id = m.message_id.clone().expect("a message id");
        assert!(
            !expected.contains(&id),
            "an unroutable message arrived: {id}"
        );
        if !seen.insert(id.clone()) {
            duplicates += 1;
            continue;
        }
        let aggregate = m.header_str("x-aggregate-id").expect("an aggregate");
        // Rows and messages of a transaction: rows first, each in seq order.
        let seq = m.json()["seq"].as_i64().expect("a seq");
        let position = if seq >= 1_000_000 {
            let g = seq - 1_000_000;
            (g / PER_TXN) * 2 * PER_TXN + PER_TXN + g % PER_TXN
        } else {
            (seq / PER_TXN) * 2 * PER_TXN + seq % PER_TXN
        };
        let before = last.insert(aggregate.clone(), position);
        assert!(
            before.is_none_or(|b| b < position),
            "aggregate {aggregate}: {id} (position {position}) after position {before:?}"
        );
    }
    println!(
        "wal lane: {} messages, {} parked, {good} delivered, {duplicates} duplicates",
        2 * all,
        expected.len()
    );
    drop(relay);
}

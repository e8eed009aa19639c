//! `outboxd status`: each source's backlog, held rows, dead letters,
//! relays and pause flag, read from the database alone (no relay needed),
//! as a table or as JSON; a source that cannot be read is named and makes
//! the exit code 1, the others are still printed.

use crate::support::db::TestDb;
use crate::support::relay::{SourceSpec, config, run_to_end};
use crate::support::{AMQP_URL, unique};

/// `status --json`, parsed: (exit code, the JSON, stderr).
pub fn status_json(cfg: &str) -> (Option<i32>, serde_json::Value, String) {
    let (code, out, err) = run_to_end(&["status", "--json"], cfg);
    let json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"));
    (code, json, err)
}

/// The source named `name` in a `status --json` answer.
pub fn source<'a>(json: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    json["sources"]
        .as_array()
        .expect("sources is a list")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("source {name} in {json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_what_the_tables_hold_without_a_running_relay() {
    let loaded = TestDb::migrated("obx_stat_loaded").await;
    let empty = TestDb::migrated("obx_stat_empty").await;
    loaded.insert_rows(5, 10).await;
    // Two rows held behind an earlier row of their aggregate, one parked.
    loaded
        .client
        .execute(
            "UPDATE outbox SET held = true WHERE id IN (SELECT id FROM outbox ORDER BY id DESC LIMIT 2)",
            &[],
        )
        .await
        .expect("hold two rows");
    loaded
        .client
        .execute(
            "INSERT INTO outbox_dead (id, aggregate_type, aggregate_id, event_type, payload, headers, \
                 dedup_key, created_at, attempts, last_error, reason) \
             VALUES (9999, 'order', 'o-x', 'X', '{}', '{}', 'dk-dead', now(), 3, 'NO_ROUTE', 'returned')",
            &[],
        )
        .await
        .expect("park one row");
    let ex = unique("obx.ex");
    let cfg = config(
        AMQP_URL,
        &[
            SourceSpec::new("loaded", &loaded.url, &ex),
            SourceSpec::new("empty", &empty.url, &ex),
        ],
    );

    let (code, json, err) = status_json(&cfg);
    assert_eq!(code, Some(0), "{err}");
    let l = source(&json, "loaded");
    assert_eq!(l["error"], serde_json::Value::Null, "{l}");
    assert_eq!(l["backlog"], 5, "{l}");
    assert_eq!(l["held"], 2, "{l}");
    assert_eq!(l["dead_letters"], 1, "{l}");
    assert_eq!(l["paused"], false, "{l}");
    assert_eq!(l["paused_since"], serde_json::Value::Null, "{l}");
    assert_eq!(l["capture"], "poll", "{l}");
    assert_eq!(l["table"], "public.outbox", "{l}");
    assert!(
        l["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0,
        "{l}"
    );
    assert_eq!(l["relays"], serde_json::json!([]), "no relay runs: {l}");
    assert_eq!(l["slot"], serde_json::Value::Null, "{l}");
    let e = source(&json, "empty");
    assert_eq!(e["backlog"], 0, "{e}");
    assert_eq!(e["held"], 0, "{e}");
    assert_eq!(e["dead_letters"], 0, "{e}");
    assert_eq!(e["oldest_pending_age_seconds"], 0.0, "{e}");

    // The table for people: a line per source, in config order.
    let (code, out, err) = run_to_end(&["status"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SOURCE"), "{out}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..4], ["loaded", "poll", "no", "5"], "{out}");
    assert_eq!(row[5..], ["2", "1", "0"], "held, dead, relays: {out}");
    assert!(lines[2].starts_with("empty"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_source_it_cannot_read_and_still_prints_the_others() {
    let db = TestDb::migrated("obx_stat_gone").await;
    db.insert_rows(3, 10).await;
    let ex = unique("obx.ex");
    let cfg = config(
        AMQP_URL,
        &[
            SourceSpec::new("orders", &db.url, &ex),
            // Nothing listens on port 1.
            SourceSpec::new("gone", "postgres://root@127.0.0.1:1/nowhere", &ex),
        ],
    );
    let (code, json, err) = status_json(&cfg);
    assert_eq!(code, Some(1), "{json}");
    assert!(
        err.contains("\"gone\"") && !err.contains("\"orders\""),
        "{err}"
    );
    assert_eq!(source(&json, "orders")["backlog"], 3, "{json}");
    let gone = source(&json, "gone");
    assert!(
        gone["error"]
            .as_str()
            .is_some_and(|e| e.contains("connect")),
        "{gone}"
    );
    assert_eq!(gone["backlog"], serde_json::Value::Null, "{gone}");

    let (code, out, _) = run_to_end(&["status"], &cfg);
    assert_eq!(code, Some(1));
    assert!(out.lines().any(|l| l.starts_with("orders")), "{out}");
    assert!(out.contains("error: cannot connect"), "{out}");
}

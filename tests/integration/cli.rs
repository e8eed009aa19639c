//! The command line: `migrate` is idempotent, `check` reports each problem,
//! secrets stay out of output (bad configs: `config_errors.rs`).

use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{BIN, Relay, SourceSpec, config, run_to_end, simple_config};
use crate::support::{AMQP_URL, unique};

#[tokio::test]
async fn migrate_twice_changes_nothing() {
    let db = TestDb::empty("obx_migrate").await;
    let cfg = simple_config(&db.url, "");
    let snapshot = || async {
        let rows = db
            .client
            .query(
                "SELECT 'col ' || column_name || ' ' || data_type || ' ' || coalesce(column_default, '') FROM information_schema.columns WHERE table_name = 'outbox' \
                 UNION ALL SELECT 'idx ' || indexdef FROM pg_indexes WHERE tablename = 'outbox' \
                 UNION ALL SELECT 'trg ' || tgname || ' ' || encode(tgargs, 'hex') FROM pg_trigger WHERE NOT tgisinternal \
                 UNION ALL SELECT 'fn ' || p.oid || ' ' || md5(prosrc) FROM pg_proc p WHERE proname = 'outbox_notify_fn' \
                 UNION ALL SELECT 'flag ' || armed FROM outbox_wakeup \
                 ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    let first = snapshot().await;
    assert!(
        first.iter().any(|l| l.starts_with("trg outbox_notify")),
        "{first:?}"
    );
    assert!(first.iter().any(|l| l.starts_with("fn ")), "{first:?}");
    assert_eq!(
        first.iter().filter(|l| l.starts_with("flag ")).count(),
        1,
        "one flag row: {first:?}"
    );
    assert_eq!(
        first.iter().filter(|l| l.starts_with("col ")).count(),
        15,
        "{first:?}"
    );
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        snapshot().await,
        first,
        "a second migrate changed the schema"
    );
}

#[tokio::test]
async fn check_passes_on_a_good_setup_and_names_each_problem_otherwise() {
    let good = TestDb::migrated("obx_check_ok").await;
    let bare = TestDb::empty("obx_check_bare").await;
    let broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("good", &good.url, &broker.exchange)],
    );
    let (code, out, err) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("ok   source good table"), "{out}");

    let missing_exchange = unique("obx.nope");
    let cfg = config(
        AMQP_URL,
        &[
            SourceSpec::new("good", &good.url, &missing_exchange),
            SourceSpec::new("bare", &bare.url, &broker.exchange),
        ],
    );
    let (code, out, _) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL source good exchange"), "{out}");
    assert!(out.contains(&missing_exchange), "{out}");
    assert!(
        out.contains("FAIL source bare table") && out.contains("outboxd migrate"),
        "{out}"
    );

    // A table migrated before the partition index existed: a warning that
    // names it, and check still passes.
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("good", &good.url, &broker.exchange)],
    );
    let (_, out, _) = run_to_end(&["check"], &cfg);
    assert!(out.contains("ok   source good partition index"), "{out}");
    assert!(out.contains("ok   source good claim index"), "{out}");
    // What a failed CREATE INDEX CONCURRENTLY leaves: an index PostgreSQL
    // does not use (marked so by hand here; the test role is a superuser).
    mark_invalid(&good.client, "outbox_partition_idx").await;
    let (code, out, _) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warn source good partition index")
            && out.contains("not valid")
            && out.contains("DROP INDEX CONCURRENTLY"),
        "{out}"
    );
    good.client
        .batch_execute("DROP INDEX outbox_partition_idx")
        .await
        .unwrap();
    let (code, out, _) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warn source good partition index")
            && out.contains("outbox_partition_idx")
            && out.contains("outboxd migrate"),
        "{out}"
    );
    // The claim index of earlier versions, on the id alone.
    good.client
        .batch_execute(
            "DROP INDEX outbox_claim_part_idx; \
             CREATE INDEX outbox_claim_idx ON outbox (id) WHERE published_at IS NULL AND NOT held",
        )
        .await
        .unwrap();
    let (code, out, _) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("warn source good claim index")
                && l.contains("outbox_claim_part_idx")
                && l.contains("outboxd migrate")),
        "{out}"
    );
}

#[tokio::test]
async fn check_names_a_missing_privilege() {
    let db = TestDb::migrated("obx_check_priv").await;
    let broker = TestBroker::new("#").await;
    let role = unique("obx_role");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT SELECT, UPDATE ON outbox TO {role};"
        ))
        .await
        .unwrap();
    let url = format!("postgres://{role}@127.0.0.1:5432/{}", db.name);
    let (code, out, _) = run_to_end(&["check"], &simple_config(&url, &broker.exchange));
    db.client
        .batch_execute(&format!(
            "REVOKE ALL ON outbox FROM {role}; DROP OWNED BY {role}; DROP ROLE {role};"
        ))
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL source orders privileges") && out.contains("DELETE"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_or_check_output() {
    const PASSWORD: &str = "pw-hunter2-secret";
    let db = TestDb::migrated("obx_secret").await;
    let mut broker = TestBroker::new("#").await;
    // Trust auth ignores the password, so the URL works and carries a secret.
    let url = format!("postgres://root:{PASSWORD}@127.0.0.1:5432/{}", db.name);
    let dead = format!("postgres://root:{PASSWORD}@127.0.0.1:1/none");
    let cfg = config(
        AMQP_URL,
        &[
            SourceSpec::new("orders", &url, &broker.exchange),
            SourceSpec::new("dead", &dead, &broker.exchange),
        ],
    );
    let relay = Relay::start(&cfg).await;
    db.insert_one("OrderCreated", "", "").await;
    broker.next(Duration::from_secs(20)).await.expect("message");
    relay
        .wait_metric(
            "outboxd_source_up{source=\"orders\"}",
            1.0,
            Duration::from_secs(20),
        )
        .await;
    let _ = relay.readyz().await;
    let (_, out, err) = run_to_end(&["check"], &cfg);
    let (_, _, bad) = run_to_end(
        &["run"],
        &cfg.replace("127.0.0.1:1/none", "127.0.0.1:notaport/none"),
    );
    let mut all = relay.logs().join("\n");
    all.push_str(&out);
    all.push_str(&err);
    all.push_str(&bad);
    assert!(all.contains("dead"), "the dead source was logged about");
    assert!(!all.contains(PASSWORD), "the password leaked");
}

/// The grants README "Least privilege" lists, and nothing more.
const RELAY_GRANTS: &str = "GRANT USAGE ON SCHEMA public TO {role}; \
     GRANT SELECT, UPDATE, DELETE ON outbox TO {role}; \
     GRANT UPDATE ON outbox_wakeup TO {role}; \
     GRANT SELECT, INSERT ON outbox_dead TO {role};";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_runs_with_only_the_documented_grants() {
    let db = TestDb::migrated("obx_leastpriv").await;
    let mut broker = TestBroker::new("order.#").await;
    let role = unique("obx_relay");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER; REVOKE ALL ON outbox FROM PUBLIC; {}",
            RELAY_GRANTS.replace("{role}", &role)
        ))
        .await
        .unwrap();
    let url = format!("postgres://{role}@127.0.0.1:5432/{}", db.name);
    let cfg = simple_config(&url, &broker.exchange);
    let (code, out, _) = run_to_end(&["check"], &cfg);
    assert_eq!(
        code,
        Some(0),
        "check passes with the documented grants:\n{out}"
    );

    let relay = Relay::start(&cfg).await;
    let good = db.insert_one("OrderCreated", "", "").await;
    let bad = db
        .insert_one("OrderCreated", "dedup_key", "repeat('k', 300)")
        .await;
    broker
        .next(Duration::from_secs(20))
        .await
        .expect("delivered as the limited role");
    crate::failures::parked(&db, bad).await;
    crate::support::eventually(
        "the delivered row to be deleted",
        Duration::from_secs(20),
        || async { db.row_state(good).await.is_none().then_some(()) },
    )
    .await;
    relay
        .wait_metric(
            "outboxd_dead_letters{source=\"orders\"}",
            1.0,
            Duration::from_secs(20),
        )
        .await;
    let denied: Vec<String> = relay
        .logs()
        .into_iter()
        .filter(|l| l.contains("permission denied"))
        .collect();
    assert!(denied.is_empty(), "no permission errors: {denied:?}");
    drop(relay);
    db.client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}

/// A database host that accepts the connection and then says nothing (a
/// half-dead load balancer, a firewall that swallows packets) is reported
/// by `check` as a failure, not waited for forever.
#[test]
fn check_reports_a_silent_database_host_instead_of_hanging() {
    // Bound but never accepted: the kernel completes the TCP handshake
    // into the backlog, and nothing ever answers PostgreSQL's startup.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://root@{}/nowhere?sslmode=disable",
        silent.local_addr().unwrap()
    );
    let started = std::time::Instant::now();
    let (code, out, err) = run_to_end(&["check"], &simple_config(&url, ""));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL source orders database") && l.contains("no answer within")),
        "{out}"
    );
    println!(
        "check gave up on the silent host after {:?}",
        started.elapsed()
    );
    drop(silent);
}

/// Sources are checked concurrently: three silent hosts cost about one
/// host's timeout, not three, and each source's lines stay together in
/// config order.
#[test]
fn check_waits_for_silent_database_hosts_concurrently_and_reports_them_in_order() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://root@{}/nowhere?sslmode=disable",
        silent.local_addr().unwrap()
    );
    let names = ["first", "second", "third"];
    let specs: Vec<SourceSpec> = names.iter().map(|n| SourceSpec::new(n, &url, "")).collect();
    let started = std::time::Instant::now();
    let (code, out, err) = run_to_end(&["check"], &config(AMQP_URL, &specs));
    let took = started.elapsed();
    assert_eq!(code, Some(1), "{out}{err}");
    // Each silent host costs one database timeout; one after another, the
    // three would take three of them.
    let one_host = outboxd::source::DB_TIMEOUT;
    assert!(
        took < one_host * 2,
        "three silent hosts took {took:?}; one takes about {one_host:?}\n{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    let fails: Vec<usize> = names
        .iter()
        .map(|n| {
            let prefix = format!("FAIL source {n} database");
            lines
                .iter()
                .position(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} line in\n{out}"))
        })
        .collect();
    assert!(fails.is_sorted(), "in config order: {fails:?}\n{out}");
    for (n, at) in names.iter().zip(&fails) {
        // The source's exchange line follows its database line directly.
        let next = lines.get(at + 1).copied().unwrap_or_default();
        assert!(
            next.starts_with(&format!("ok   source {n} exchange")),
            "the lines of {n} are together:\n{out}"
        );
    }
    println!("check gave up on three silent hosts after {took:?}");
    drop(silent);
}

/// `outboxd health --url URL`: (exit code, stdout, stderr).
fn health(url: &str) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(BIN)
        .args(["health", "--url", url])
        .env_remove("OUTBOXD_HEALTH_URL")
        .env_remove("OUTBOXD_LOG_FORMAT")
        .output()
        .expect("run outboxd health");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn health_exits_0_for_a_running_relay_and_1_for_a_closed_port() {
    let db = TestDb::migrated("obx_health").await;
    let broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    let (code, out, err) = health(&format!("http://{}", relay.admin));
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains(&format!("http://{}/healthz answered 200", relay.admin)),
        "{out}"
    );

    // Bound, then released: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let (code, out, err) = health(&format!("http://{closed}"));
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!(
            "not healthy: cannot connect to http://{closed}/healthz"
        )),
        "{err}"
    );

    // A URL it cannot use is bad usage, like any bad argument.
    let (code, _, err) = health("https://127.0.0.1:9187");
    assert_eq!(code, Some(2), "{err}");
}

/// `migrate --concurrently` on a table migrated before some indexes
/// existed: builds them concurrently (valid, and the same definitions a
/// plain migrate makes, the claim index of earlier versions, on the id
/// alone, gone), leaves the rows alone, and refuses, naming it, an
/// index a failed concurrent build left invalid.
#[tokio::test]
async fn migrate_concurrently_builds_missing_indexes_and_names_an_invalid_one() {
    let db = TestDb::migrated("obx_migrate_conc").await;
    let cfg = simple_config(&db.url, "");
    let indexdefs = || async {
        db.client
            .query(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'outbox' ORDER BY indexname",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let planned = indexdefs().await;
    db.client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'o-' || g, 'Created', '{}' FROM generate_series(1, 1000) g; \
             DROP INDEX outbox_partition_idx; DROP INDEX outbox_waiting_idx; \
             DROP INDEX outbox_claim_part_idx",
        )
        .await
        .unwrap();
    // Apart: not in the transaction of the inserts, whose deferred
    // trigger events are pending until it commits.
    db.client
        .batch_execute(
            "CREATE INDEX outbox_claim_idx ON outbox (id) WHERE published_at IS NULL AND NOT held",
        )
        .await
        .unwrap();
    let (code, _, err) = run_to_end(&["migrate", "--concurrently"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("building index concurrently")
            && [
                "outbox_partition_idx",
                "outbox_waiting_idx",
                "outbox_claim_part_idx"
            ]
            .iter()
            .all(|i| err.contains(i)),
        "{err}"
    );
    assert_eq!(
        indexdefs().await,
        planned,
        "the same indexes as a plain migrate"
    );
    let invalid: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'outbox'::regclass AND NOT indisvalid",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(invalid, 0);
    assert_eq!(db.count().await, 1000);

    // Idempotent: nothing left to build.
    let (code, _, err) = run_to_end(&["migrate", "--concurrently"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("building index"), "{err}");

    // What a failed concurrent build leaves (marked by hand; the test
    // role is a superuser): named, with what to do, and exit 1.
    mark_invalid(&db.client, "outbox_held_idx").await;
    let (code, _, err) = run_to_end(&["migrate", "--concurrently"], &cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("outbox_held_idx")
            && err.contains("not valid")
            && err.contains("DROP INDEX CONCURRENTLY"),
        "{err}"
    );
}

/// A producer's transaction left open holds a lock that migrate's DDL
/// needs: migrate gives up after `--lock-timeout` (exit 1, naming the
/// table and what to do) instead of waiting while every new insert queues
/// behind it, and goes through once the transaction has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_gives_up_on_a_locked_table_after_its_lock_timeout() {
    let db = TestDb::migrated("obx_migrate_lock").await;
    let cfg = simple_config(&db.url, "");
    let open = db.connect().await;
    open.batch_execute(
        "BEGIN; INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('order', 'o-1', 'Created', '{}')",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let (code, _, err) = run_to_end(&["migrate", "--lock-timeout", "1s"], &cfg);
    let waited = started.elapsed();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("could not lock table")
            && err.contains("public.outbox")
            && err.contains("within 1s")
            && err.contains("--lock-timeout"),
        "{err}"
    );
    assert!(waited < Duration::from_secs(15), "gave up after {waited:?}");
    open.batch_execute("COMMIT").await.unwrap();
    let (code, _, err) = run_to_end(&["migrate", "--lock-timeout", "1s"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(db.count().await, 1, "the producer's row is kept");
}

/// Marks `index` not valid, as a failed CREATE INDEX CONCURRENTLY leaves it
/// (the test role is a superuser).
async fn mark_invalid(client: &tokio_postgres::Client, index: &str) {
    client
        .execute(
            "UPDATE pg_catalog.pg_index SET indisvalid = false WHERE indexrelid = $1::text::regclass",
            &[&index],
        )
        .await
        .unwrap();
}

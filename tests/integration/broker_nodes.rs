//! `rabbitmq.urls` against the shared broker and a port where nothing
//! listens: `check` reports each node, and the relay connects to the
//! node that answers. (A real cluster losing a node is in
//! tests/outages/failover.rs.)

use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::proxy::Proxy;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_HOST, AMQP_URL, eventually};

/// A loopback URL where nothing listens (the port was free a moment ago).
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// `config` with `url = …` replaced by `urls = [urls…]`.
fn with_urls(text: &str, urls: &[&str]) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let out = text.replace(
        &format!("url = {AMQP_URL:?}"),
        &format!("urls = [{}]", list.join(", ")),
    );
    assert!(out.contains("urls = ["), "{out}");
    out
}

#[tokio::test]
async fn check_reports_each_node_and_fails_only_when_none_answers() {
    let db = TestDb::migrated("obx_nodes_check").await;
    let broker = TestBroker::new("#").await;
    let base = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    );
    let dead = dead_url();

    let (code, out, err) = run_to_end(&["check"], &with_urls(&base, &[&dead, AMQP_URL]));
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("warn rabbitmq node 1 of 2: cannot connect to 127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.contains("ok   rabbitmq node 2 of 2: connected to 127.0.0.1:5672// as guest"),
        "{out}"
    );
    // the exchange is checked over the node that answered
    assert!(out.contains("ok   source orders exchange"), "{out}");
    assert!(!out.contains("guest:guest"), "{out}");

    let (code, out, _) = run_to_end(&["check"], &with_urls(&base, &[&dead, &dead_url()]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL rabbitmq node 1 of 2"), "{out}");
    assert!(out.contains("FAIL rabbitmq node 2 of 2"), "{out}");
}

#[tokio::test]
async fn the_relay_skips_a_node_that_does_not_answer_and_delivers_through_the_next() {
    let db = TestDb::migrated("obx_nodes_run").await;
    let mut broker = TestBroker::new("#").await;
    let text = with_urls(
        &config(
            AMQP_URL,
            &[SourceSpec::new("orders", &db.url, &broker.exchange)],
        ),
        &[&dead_url(), AMQP_URL],
    );
    let relay = Relay::start(&text).await;
    let keys = db.insert_rows(50, 10).await;
    let got = broker.collect(50, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 50);
    let connected = eventually(
        "the connection's log line",
        Duration::from_secs(30),
        || async { relay.log_lines_with("connected to rabbitmq").pop() },
    )
    .await;
    assert_eq!(connected["node"], 2, "{connected}");
    assert_eq!(
        connected["broker"], "127.0.0.1:5672// as guest",
        "{connected}"
    );
    // The dead node was tried first and skipped without a backoff.
    let skipped = relay.log_lines_with("trying the next one");
    assert_eq!(
        skipped.first().map(|l| l["node"].clone()),
        Some(1.into()),
        "{skipped:?}"
    );
    assert_eq!(
        relay.metric("outboxd_broker_connections_total").await,
        Some(1.0)
    );
    let mut ids: Vec<String> = got.into_iter().filter_map(|m| m.message_id).collect();
    ids.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(ids, keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_heartbeat_0_is_warned_about_and_still_relays() {
    let db = TestDb::migrated("obx_heartbeat0").await;
    let mut broker = TestBroker::new("#").await;
    let url = format!("{AMQP_URL}?heartbeat=0");
    let relay = Relay::start(&config(
        &url,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    ))
    .await;
    db.insert_one("OrderCreated", "", "").await;
    broker
        .next(Duration::from_secs(20))
        .await
        .expect("the row arrives");
    let warned = relay.log_lines_with("heartbeat=0");
    assert_eq!(warned.len(), 1, "one warning per connection: {warned:?}");
    assert_eq!(warned[0]["level"], "WARN", "{}", warned[0]);
    assert!(
        !warned[0].to_string().contains("guest:guest"),
        "no credentials in the log: {}",
        warned[0]
    );
}

const WAIT_LOG: Duration = Duration::from_secs(5);

/// Waits for the relay's WARN that it gave a silent connection up.
async fn said_it_gave_the_connection_up(relay: &Relay) {
    eventually(
        "the relay to say it gave the connection up",
        WAIT_LOG,
        || async {
            (!relay
                .log_lines_with("did not answer on this connection")
                .is_empty())
            .then_some(())
        },
    )
    .await;
}

/// With `heartbeat=0` nothing tells lapin that a connection died silently
/// (a network partition: no byte, no close). A batch then waits on the
/// broker only as long as the confirm timeout, after which the relay gives
/// the connection up and reconnects, here to the second node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_without_heartbeats_is_given_up_and_the_next_node_takes_over() {
    let db = TestDb::migrated("obx_silent_node").await;
    let mut broker = TestBroker::new("#").await;
    let first = Proxy::start(AMQP_HOST).await;
    let second = Proxy::start(AMQP_HOST).await;
    let url = |p: &Proxy| format!("amqp://guest:guest@{}/%2f?heartbeat=0", p.addr);
    let base = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    )
    .replace("confirm_timeout = \"5s\"", "confirm_timeout = \"1s\"");
    let relay = Relay::start(&with_urls(&base, &[&url(&first), &url(&second)])).await;
    db.insert_one("OrderCreated", "", "").await;
    broker
        .next(Duration::from_secs(20))
        .await
        .expect("the first row arrives over the first node");
    assert_eq!(second.accepted(), 0, "the relay started on the first node");

    first.blackhole();
    let id = db.insert_one("OrderCreated", "", "").await;
    // 1 s for the confirm, 1 s for a channel on the silent connection, up
    // to 10 s for a connect to the silent node, then the second node.
    let m = broker
        .next(Duration::from_secs(60))
        .await
        .expect("the row committed during the partition arrives over the second node");
    assert_eq!(
        m.headers.get("x-outbox-id"),
        Some(&lapin::types::AMQPValue::LongLongInt(id))
    );
    assert!(second.accepted() >= 1, "delivered over the second node");
    said_it_gave_the_connection_up(&relay).await;
    eventually("the outbox to empty", Duration::from_secs(20), || async {
        (db.count().await == 0).then_some(())
    })
    .await;
}

/// Rows of about 5 MB: one alone is more than the socket buffers between
/// the relay and a blackholed proxy hold (loopback: at most 4 MB to send,
/// 128 kB to receive, 64 kB in the proxy), so its writes stall rather than
/// vanish into the kernel, however few rows the relay puts in a batch (a
/// wal relay starts on the first rows it decodes).
const STALL_ROWS: usize = 4;

/// With a silent connection a big batch cannot even be written: the
/// writes are bounded by the confirm timeout too, and the connection is
/// given up on. `capture` is "poll" or "wal" (the ordered lane).
async fn stalled_writes_are_given_up(capture: &str) {
    let db = TestDb::migrated(&format!("obx_stall_{capture}")).await;
    let mut broker = TestBroker::new("#").await;
    let first = Proxy::start(AMQP_HOST).await;
    let second = Proxy::start(AMQP_HOST).await;
    let url = |p: &Proxy| format!("amqp://guest:guest@{}/%2f?heartbeat=0", p.addr);
    // The wal source is named after its database, so its slot is its own.
    let spec = SourceSpec::new(&db.name, &db.url, &broker.exchange)
        .set("capture", &format!("{capture:?}"));
    let base =
        config(AMQP_URL, &[spec]).replace("confirm_timeout = \"5s\"", "confirm_timeout = \"1s\"");
    let (code, _, err) = run_to_end(&["migrate"], &base);
    assert_eq!(code, Some(0), "migrate: {err}");
    let relay = Relay::start(&with_urls(&base, &[&url(&first), &url(&second)])).await;
    db.insert_one("OrderCreated", "", "").await;
    broker
        .next(Duration::from_secs(20))
        .await
        .expect("the first row arrives over the first node");
    assert_eq!(second.accepted(), 0, "the relay started on the first node");

    first.blackhole();
    let ids: Vec<i64> = db
        .client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'big', 'Big', jsonb_build_object('n', n, 'pad', repeat('x', 5000000)) \
             FROM generate_series(1, $1::int) AS n RETURNING id",
            &[&(STALL_ROWS as i32)],
        )
        .await
        .expect("insert the big batch")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut missing: std::collections::BTreeSet<i64> = ids.into_iter().collect();
    let mut order = Vec::new();
    while !missing.is_empty() {
        let m = broker
            .next(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("{} rows never arrived (capture {capture})", missing.len()));
        if let Some(lapin::types::AMQPValue::LongLongInt(id)) = m.headers.get("x-outbox-id") {
            missing.remove(id);
            order.push(*id);
        }
    }
    assert!(second.accepted() >= 1, "delivered over the second node");
    // Nothing went over the first node after the blackhole, so nothing
    // arrives twice, and the one aggregate arrives in order.
    assert!(order.is_sorted(), "out of order: {order:?}");
    said_it_gave_the_connection_up(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stalled_on_a_silent_connection_are_given_up_when_polling() {
    stalled_writes_are_given_up("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stalled_on_a_silent_connection_are_given_up_on_the_wal_lane() {
    stalled_writes_are_given_up("wal").await;
}

//! A RabbitMQ cluster loses the node outboxd is connected to while rows
//! flow into a quorum queue: outboxd moves to another node and every row
//! arrives. The cluster is the test's own (3 nodes on loopback ports from
//! `BASE_PORT`), stopped at the end also when the test fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::private_rabbit::{PrivateRabbit, declare, drain_ids, process_gone};
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{eventually, unique};
use crate::{LONG, all_arrived};

/// Rows in the table before the relay starts; a producer adds more, in
/// transactions of `CHUNK`, until the flow has resumed on another node, so
/// the node stops mid-flow however fast the relay drains (under CPU load a
/// node's clean stop took 10 s, long enough for the relay to send a whole
/// pre-filled table to it first, and the test then tested nothing).
const PREFILL: usize = 5_000;
const CHUNK: i64 = 100;
/// Ports 17310-17312 (AMQP) and 17330-17332 (distribution; the CLI uses
/// 27330 and up): far from the shared broker's 5672, 25672 and 15672, and
/// below Linux's ephemeral range (32768-60999), where an outgoing
/// connection of another test once held 47350 and a node could not listen.
const BASE_PORT: u16 = 17310;

/// The node (1-based) of the last "connected to rabbitmq" log line.
fn connected_node(relay: &Relay) -> Option<u16> {
    let lines = relay.log_lines_with("connected to rabbitmq");
    let node = lines.last()?["node"].as_u64()?;
    u16::try_from(node).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connected_cluster_node_stopped_mid_flow_outboxd_moves_on_and_every_row_arrives() {
    let began = Instant::now();
    let cluster = PrivateRabbit::start(BASE_PORT, &[]);
    let name = unique("obx.failover");
    declare(&cluster.url(1), &name, true).await;
    let db = TestDb::migrated("obx_failover").await;
    let mut keys = db.insert_rows(PREFILL, 100).await;

    let connection_name = unique("outboxd-failover");
    let urls: Vec<String> = (1..=3).map(|i| format!("{:?}", cluster.url(i))).collect();
    let text = config(
        &cluster.url(1),
        &[SourceSpec::new("orders", &db.url, &name)],
    )
    .replace(
        &format!("url = {:?}", cluster.url(1)),
        &format!(
            "urls = [{}]\nconnection_name = {connection_name:?}",
            urls.join(", ")
        ),
    );
    assert!(text.contains("urls = ["), "{text}");
    let relay = Relay::start(&text).await;
    let published = || async {
        relay
            .metric("outboxd_messages_published_total{source=\"orders\"}")
            .await
            .unwrap_or(0.0)
    };

    let first = eventually("a connection to a node", LONG, || async {
        connected_node(&relay)
    })
    .await;
    // The broker agrees about which node has the relay's connection.
    let on_first = cluster.ctl(first, &["list_connections", "client_properties"]);
    assert!(on_first.contains(&connection_name), "{on_first}");
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let client = db.connect().await;
        let producing = producing.clone();
        tokio::spawn(async move {
            let mut keys = Vec::new();
            let mut seq = PREFILL as i64;
            while producing.load(Ordering::Relaxed) {
                let rows = client
                    .query(
                        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                         SELECT 'order', 'o-' || g, 'OrderCreated', jsonb_build_object('seq', g) \
                         FROM generate_series($1::bigint, $2::bigint) g ORDER BY g RETURNING dedup_key",
                        &[&seq, &(seq + CHUNK - 1)],
                    )
                    .await
                    .expect("the producer's insert");
                keys.extend(rows.iter().map(|r| r.get::<_, String>(0)));
                seq += CHUNK;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            keys
        })
    };
    eventually("rows to flow", LONG, || async {
        (published().await >= 2_000.0).then_some(())
    })
    .await;

    let at_stop = published().await;
    let stopped = Instant::now();
    let first_pid = cluster.sigterm(first);
    relay
        .wait_metric("outboxd_broker_connections_total", 2.0, LONG)
        .await;
    let reconnected = stopped.elapsed();
    let at_reconnect = published().await;
    eventually("the flow to resume", LONG, || async {
        (published().await > at_reconnect).then_some(())
    })
    .await;
    let resumed = stopped.elapsed();
    let second = connected_node(&relay).expect("a second connection was logged");
    // The log names the node in its display form, never with the password.
    let line = relay.log_lines_with("connected to rabbitmq");
    let line = line.last().expect("the line just read");
    assert_eq!(
        line["broker"],
        format!("127.0.0.1:{}// as guest", BASE_PORT + second - 1),
        "{line}"
    );
    assert!(!line.to_string().contains("guest:guest"), "{line}");
    assert_ne!(second, first, "outboxd connected to the stopped node again");
    eventually("the stopped node to exit", LONG, || async {
        process_gone(first_pid).then_some(())
    })
    .await;
    let on_second = cluster.ctl(second, &["list_connections", "client_properties"]);
    assert!(on_second.contains(&connection_name), "{on_second}");

    producing.store(false, Ordering::Relaxed);
    keys.extend(producer.await.expect("the producer"));
    eventually("an empty table", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let survivor = cluster.url(second);
    let seen = drain_ids(&survivor, &name).await;
    let duplicates = all_arrived(&keys, &seen);
    let connects = relay
        .metric("outboxd_broker_connections_total")
        .await
        .expect("the counter is exported");
    assert_eq!(connects, 2.0, "one connection before the stop, one after");
    println!(
        "cluster failover: {} rows, node {first} of 3 stopped (SIGTERM) with {at_stop} published and the producer writing; \
         reconnected to node {second} after {:.2} s, flow resumed after {:.2} s; \
         all arrived, {duplicates} duplicates; test took {:.1} s",
        keys.len(),
        reconnected.as_secs_f64(),
        resumed.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
}

//! A RabbitMQ cluster loses the node outboxd is connected to while 20k
//! rows flow into a quorum queue: outboxd moves to another node and every
//! row arrives. The cluster is the test's own (3 nodes on loopback ports
//! from `BASE_PORT`), stopped at the end also when the test fails.

use std::time::Instant;

use crate::private_rabbit::{PrivateRabbit, declare, drain_ids, process_gone};
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{eventually, unique};
use crate::{LONG, all_arrived};

const ROWS: usize = 20_000;
/// Ports 47310-47312 (AMQP) and 47330-47332 (distribution; the CLI uses
/// 57330 and up): far from the shared broker's 5672, 25672 and 15672.
const BASE_PORT: u16 = 47310;

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
    let keys = db.insert_rows(ROWS, 100).await;

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

    let first = eventually("a connection to a node", LONG, || async {
        connected_node(&relay)
    })
    .await;
    // The broker agrees about which node has the relay's connection.
    let on_first = cluster.ctl(first, &["list_connections", "client_properties"]);
    assert!(on_first.contains(&connection_name), "{on_first}");
    eventually("rows to flow", LONG, || async {
        (db.count().await < ROWS as i64 - 2_000).then_some(())
    })
    .await;

    let left_at_stop = db.count().await;
    let stopped = Instant::now();
    let first_pid = cluster.sigterm(first);
    relay
        .wait_metric("outboxd_broker_connections_total", 2.0, LONG)
        .await;
    let reconnected = stopped.elapsed();
    let left_at_reconnect = db.count().await;
    eventually("the flow to resume", LONG, || async {
        (db.count().await < left_at_reconnect).then_some(())
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
        "cluster failover: {ROWS} rows, node {first} of 3 stopped (SIGTERM) with {left_at_stop} left; \
         reconnected to node {second} after {:.2} s, flow resumed after {:.2} s; \
         all arrived, {duplicates} duplicates; test took {:.1} s",
        reconnected.as_secs_f64(),
        resumed.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
}

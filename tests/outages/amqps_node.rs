//! AMQPS against a real RabbitMQ TLS listener: a node of the test's own
//! (`scripts/rabbit-cluster.sh --nodes 1 --tls`) whose listener has a
//! server certificate from a test CA and asks every client for a
//! certificate from that CA (`verify_peer`, `fail_if_no_peer_cert`).
//! One node, three relays in turn: a wrong CA is refused by outboxd, no
//! client certificate is refused by the broker, and with the right CA
//! and a client certificate the rows the first two kept go out.

use crate::private_rabbit::{PrivateRabbit, declare, drain_ids};
use crate::support::certs::{Certs, s};
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{eventually, unique};
use crate::{LONG, all_arrived};

const ROWS: usize = 200;
/// AMQP 17350, AMQPS 17360, distribution 17370 (the CLI: 27370 and up):
/// below Linux's ephemeral port range, see `failover.rs`.
const BASE_PORT: u16 = 17350;

/// A relay on `db` publishing to `exchange` over amqps:// with `tls_keys`.
async fn relay(node: &PrivateRabbit, db: &TestDb, exchange: &str, tls_keys: &str) -> Relay {
    let url = format!("amqps://guest:guest@localhost:{}/%2f", node.amqps_port(1));
    let text = config(&url, &[SourceSpec::new("orders", &db.url, exchange)]).replace(
        "confirm_timeout = \"5s\"\n",
        &format!("confirm_timeout = \"5s\"\n{tls_keys}\n"),
    );
    assert!(text.contains(tls_keys), "{text}");
    Relay::start(&text).await
}

/// The `error` of the first "cannot connect to rabbitmq" line.
async fn connect_error(relay: &Relay) -> String {
    eventually("a failed connection attempt", LONG, || async {
        let lines = relay.log_lines_with("cannot connect to rabbitmq");
        lines.first()?["error"].as_str().map(str::to_owned)
    })
    .await
}

/// How many connections the node let in as `guest` so far (its own log).
fn logins(node: &PrivateRabbit) -> usize {
    std::fs::read_to_string(node.log_file(1))
        .unwrap_or_default()
        .matches("user 'guest' authenticated")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_a_real_tls_node_needs_the_right_ca_and_a_client_certificate() {
    let certs = Certs::new();
    let node = PrivateRabbit::start(BASE_PORT, &["--nodes", "1", "--tls", s(&certs.dir)]);
    let exchange = unique("obx.amqps");
    // Set up over the node's plain listener.
    declare(&node.url(1), &exchange, false).await;
    let db = TestDb::migrated("obx_amqps_node").await;
    let keys = db.insert_rows(ROWS, 10).await;
    let ca = |path| format!("tls_ca_file = {:?}", s(path));
    let client = format!(
        "tls_cert_file = {:?}\ntls_key_file = {:?}",
        s(&certs.client_crt),
        s(&certs.client_key)
    );
    // The set-up connection logged in: the count below counts something.
    let before = eventually("the set-up login in the node's log", LONG, || async {
        let n = logins(&node);
        (n >= 1).then_some(n)
    })
    .await;

    // A CA that did not sign the node's certificate: outboxd ends the
    // handshake itself, before any AMQP (and so before the password).
    let wrong_ca = relay(
        &node,
        &db,
        &exchange,
        &format!("{}\n{client}", ca(&certs.other_ca)),
    )
    .await;
    let err = connect_error(&wrong_ca).await;
    assert!(
        err.contains("TLS handshake") && err.contains("certificate was refused"),
        "{err}"
    );
    assert_eq!(wrong_ca.metric("outboxd_broker_up").await, Some(0.0));
    drop(wrong_ca);

    // No client certificate: the node ends the handshake.
    let no_client = relay(&node, &db, &exchange, &ca(&certs.ca)).await;
    let err = connect_error(&no_client).await;
    // The broker's alert, or its close when that overtakes the alert.
    assert!(
        (err.contains("asks for a client certificate") && err.contains("CertificateRequired"))
            || err.contains("if it requires client certificates"),
        "{err}"
    );
    assert_eq!(no_client.metric("outboxd_broker_up").await, Some(0.0));
    let (code, ready) = no_client.readyz().await;
    assert_eq!((code, &ready["broker_up"]), (503, &false.into()), "{ready}");
    drop(no_client);
    // Neither got as far as logging in, and neither lost a row.
    assert_eq!(logins(&node), before, "a refused relay logged in");
    assert_eq!(db.count().await, ROWS as i64);

    // The right CA and a client certificate: every row goes out.
    let good = relay(
        &node,
        &db,
        &exchange,
        &format!("{}\n{client}", ca(&certs.ca)),
    )
    .await;
    eventually("an empty table", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    // The broker saw TLS and our client certificate.
    let conns = node.ctl(1, &["list_connections", "ssl", "peer_cert_subject"]);
    assert!(
        conns.contains("true") && conns.contains("CN=outboxd test client"),
        "{conns}"
    );
    let seen = drain_ids(&node.url(1), &exchange).await;
    let duplicates = all_arrived(&keys, &seen);
    assert_eq!(duplicates, 0);
    drop(good);
    println!(
        "amqps to a real TLS node: wrong CA refused by outboxd, no client certificate refused \
         by the node ({err}), {ROWS} rows delivered with the right CA and a client certificate"
    );
}

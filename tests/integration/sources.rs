//! Several sources in one process, each with its own pool and task: a dead
//! one does not stall the others.

use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_source_does_not_stall_the_live_ones() {
    let a = TestDb::migrated("obx_src_a").await;
    let b = TestDb::migrated("obx_src_b").await;
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[
            // Nothing listens on port 1: this source never gets a connection.
            SourceSpec::new("dead", "postgres://root@127.0.0.1:1/none", &broker.exchange),
            SourceSpec::new("alpha", &a.url, &broker.exchange),
            SourceSpec::new("beta", &b.url, &broker.exchange),
        ],
    );
    let relay = Relay::start(&cfg).await;

    a.insert_rows(100, 10).await;
    b.insert_rows(100, 10).await;
    let got = broker.collect(200, WAIT).await;
    let from = |s: &str| {
        got.iter()
            .filter(|m| m.header_str("x-outbox-source").as_deref() == Some(s))
            .count()
    };
    assert_eq!(
        (from("alpha"), from("beta")),
        (100, 100),
        "both live sources delivered everything"
    );

    relay
        .wait_metric("outboxd_source_up{source=\"alpha\"}", 1.0, WAIT)
        .await;
    relay
        .wait_metric("outboxd_source_up{source=\"dead\"}", 0.0, WAIT)
        .await;
    let (code, body) = eventually("the dead source's error in /readyz", WAIT, || async {
        let (code, body) = relay.readyz().await;
        body["sources"][0]["last_error"]
            .is_string()
            .then_some((code, body))
    })
    .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["sources"][0]["name"], "dead");
    assert_eq!(body["sources"][0]["database_up"], false);
    assert_eq!(body["sources"][1]["database_up"], true);
    assert!(
        relay
            .metric("outboxd_source_errors_total{reason=\"database\",source=\"dead\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
}

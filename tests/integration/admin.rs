//! The admin port under idle connections: the relay's descriptors stay
//! bounded, `/healthz` keeps answering, and idle sockets are closed.

use std::time::{Duration, Instant};

use outboxd::admin::{IDLE_TIMEOUT, MAX_CONNECTIONS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::http;
use crate::support::relay::{Relay, simple_config};

/// Open file descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_neither_exhaust_descriptors_nor_block_healthz_and_are_closed() {
    const IDLE_SOCKETS: usize = 300;
    const SLOW_HEADERS: usize = 8;
    // Pool connections the relay may open meanwhile, and the like.
    const SLACK: usize = 16;
    let db = TestDb::migrated("obx_admin_idle").await;
    let broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    relay.wait_ready(200, Duration::from_secs(20)).await;
    let before = descriptors(relay.pid());

    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_SOCKETS);
    for i in 0..IDLE_SOCKETS {
        let mut socket = TcpStream::connect(relay.admin).await.expect("connect");
        // The newest few start a request and never finish its header.
        if i >= IDLE_SOCKETS - SLOW_HEADERS {
            socket
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write a partial header");
        }
        idle.push(socket);
    }
    // The probe comes after every idle socket and is still answered at once.
    let asked = Instant::now();
    let (code, body) =
        tokio::time::timeout(Duration::from_secs(2), http::get(relay.admin, "/healthz"))
            .await
            .expect("/healthz answers within 2 s behind 300 idle sockets")
            .expect("/healthz is reachable");
    println!("/healthz answered in {:?}", asked.elapsed());
    assert_eq!(code, 200, "{body}");
    let during = descriptors(relay.pid());
    println!("descriptors: {before} before, {during} with {IDLE_SOCKETS} idle sockets open");
    assert!(
        during <= before + MAX_CONNECTIONS + SLACK,
        "{during} descriptors with {IDLE_SOCKETS} idle sockets open ({before} before)"
    );

    // Every idle socket is closed by the relay, a partial header included:
    // at once if it made room for a newer one, else after the idle timeout.
    let deadline = tokio::time::Instant::from_std(opened + IDLE_TIMEOUT + Duration::from_secs(10));
    let mut buf = [0u8; 64];
    for (i, socket) in idle.iter_mut().enumerate() {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("idle socket {i} was sent {n} bytes"),
            Err(_) => panic!(
                "idle socket {i} still open {:?} after it opened",
                opened.elapsed()
            ),
        }
    }
    println!(
        "all {IDLE_SOCKETS} idle sockets closed after {:?}",
        opened.elapsed()
    );
    let after = descriptors(relay.pid());
    assert!(
        after <= before + SLACK,
        "{after} descriptors once the idle sockets are closed ({before} before)"
    );
}

//! Reconnecting must not leak: after many broker and database cuts the
//! relay holds as many descriptors as before.

use std::time::Duration;

use crate::{LONG, Proxied, proxied};

fn threads(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

fn fd_list(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        })
        .map(|t| {
            t.split(':').next().unwrap_or("").to_owned()
                + t.split_once(':')
                    .map(|(_, r)| {
                        if r.starts_with('[') && !r.starts_with("[0-9") {
                            r
                        } else {
                            ""
                        }
                    })
                    .unwrap_or("")
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reconnects_leak_no_file_descriptors() {
    let Proxied {
        db,
        q: _q,
        pg,
        amqp,
        relay,
    } = proxied("obx_leak").await;
    // One of each cut first: the first reconnects create things that stay
    // for good (tokio's blocking pool, async-compat's runtime for lapin).
    let mut before = Vec::new();
    for round in 0..14 {
        if round == 2 {
            before = fd_list(relay.pid());
        }
        let proxy = if round % 2 == 0 { &amqp } else { &pg };
        proxy.cut();
        relay.wait_ready(503, LONG).await;
        proxy.restore();
        relay.wait_ready(200, LONG).await;
        db.insert_rows(5, 10).await;
    }
    // Let anything closing asynchronously finish closing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = fd_list(relay.pid());
    println!("fds before: {before:?}\nfds after:  {after:?}");
    println!("threads: {:?}", threads(relay.pid()));
    assert!(
        after.len() <= before.len() + 1,
        "descriptors leaked: {} -> {}",
        before.len(),
        after.len()
    );
}

//! `sslmode = "require"` and `"verify-full"` against a PostgreSQL that
//! refuses TLS: a fake server answers the SSLRequest with `N`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{Certs, LONG, check_blocking, contains, s};
use crate::support::eventually;
use crate::support::relay::{Relay, SourceSpec, config};

/// A fake PostgreSQL that answers every SSLRequest with `N` ("no TLS
/// here") and records anything the client sends after that.
struct NoTlsPostgres {
    addr: SocketAddr,
    ssl_requests: Arc<AtomicUsize>,
    after: Arc<Mutex<Vec<u8>>>,
    /// Connections accepted, and those read to their end.
    accepted: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

/// The SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl NoTlsPostgres {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let ssl_requests = Arc::new(AtomicUsize::new(0));
        let after = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let (n, log, a, f) = (
            ssl_requests.clone(),
            after.clone(),
            accepted.clone(),
            finished.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (n, log, f) = (n.clone(), log.clone(), f.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 8];
                    if client.read_exact(&mut first).await.is_ok() {
                        if first == SSL_REQUEST {
                            n.fetch_add(1, Ordering::SeqCst);
                            let _ = client.write_all(b"N").await;
                        } else {
                            log.lock().unwrap().extend_from_slice(&first);
                        }
                        // Whatever comes next would be the StartupMessage.
                        let mut buf = [0u8; 1024];
                        while let Ok(Ok(k @ 1..)) =
                            tokio::time::timeout(LONG, client.read(&mut buf)).await
                        {
                            log.lock().unwrap().extend_from_slice(&buf[..k]);
                        }
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            ssl_requests,
            after,
            accepted,
            finished,
        }
    }

    /// Waits until every connection so far has been read to its end.
    async fn drained(&self) {
        eventually("the fake's connections to end", LONG, || async {
            let a = self.accepted.load(Ordering::SeqCst);
            (self.finished.load(Ordering::SeqCst) == a).then_some(())
        })
        .await;
    }
}

/// `sslmode` require and verify-full, as keys or in the URL, against a
/// server without TLS: the connection fails and no user name (no
/// StartupMessage at all) goes out in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_and_verify_full_fail_against_a_server_without_tls() {
    let certs = Certs::new();
    let fake = NoTlsPostgres::start().await;
    const USER: &str = "obx_secret_user";
    let url = format!("postgres://{USER}@{}/orders", fake.addr);
    let ca = format!("{:?}", s(&certs.ca));
    let cases: [(&str, SourceSpec); 4] = [
        (
            "key require",
            SourceSpec::new("orders", &url, "").set("sslmode", "\"require\""),
        ),
        (
            "key verify-full",
            SourceSpec::new("orders", &url, "")
                .set("sslmode", "\"verify-full\"")
                .set("sslrootcert", &ca),
        ),
        (
            "url require",
            SourceSpec::new("orders", &format!("{url}?sslmode=require"), ""),
        ),
        (
            "url verify-full",
            SourceSpec::new(
                "orders",
                &format!("{url}?sslmode=verify-full&sslrootcert={}", s(&certs.ca)),
                "",
            ),
        ),
    ];
    for (what, spec) in cases {
        let before = fake.ssl_requests.load(Ordering::SeqCst);
        let (code, out, err) = check_blocking(config(crate::support::AMQP_URL, &[spec]))
            .await
            .expect("check");
        assert_eq!(code, Some(1), "{what}: stdout: {out}\nstderr: {err}");
        let line = out
            .lines()
            .find(|l| l.starts_with("FAIL source orders database"))
            .unwrap_or_else(|| panic!("{what}: no FAIL database line in {out}"));
        assert!(line.contains("does not support TLS"), "{what}: {line}");
        assert!(
            fake.ssl_requests.load(Ordering::SeqCst) > before,
            "{what}: the client asked for TLS first"
        );
    }
    // `run` (pool and listener connections) refuses the same way.
    let cfg = config(
        crate::support::AMQP_URL,
        &[SourceSpec::new("orders", &url, "").set("sslmode", "\"require\"")],
    );
    let before = fake.ssl_requests.load(Ordering::SeqCst);
    let relay = Relay::start(&cfg).await;
    eventually("the relay to report the refusal", LONG, || async {
        relay
            .logs()
            .iter()
            .any(|l| l.contains("does not support TLS"))
            .then_some(())
    })
    .await;
    assert!(fake.ssl_requests.load(Ordering::SeqCst) > before);
    drop(relay);

    fake.drained().await;
    let after = fake.after.lock().unwrap().clone();
    assert!(
        !contains(&after, USER.as_bytes()),
        "the user name went out in the clear: {:?}",
        String::from_utf8_lossy(&after)
    );
    assert!(after.is_empty(), "nothing follows the refused SSLRequest");
}

//! TLS against peers that do not play along: `amqps://` pointed at a plain
//! AMQP port, a TLS broker whose certificate comes from the right or the
//! wrong CA, and a PostgreSQL that refuses TLS. The shared services are
//! never reconfigured: a TLS-terminating proxy written here stands in for
//! a broker with a TLS listener, and a fake PostgreSQL answers the
//! SSLRequest itself. Certificates come from the `openssl` CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_HOST, eventually, unique};

const LONG: Duration = Duration::from_secs(30);

/// A temporary directory with a test CA, a second unrelated CA, and a
/// server certificate for 127.0.0.1 and localhost signed by the first.
struct Certs {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("outboxd-tlspeers"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = Self::ca(&dir, "ca");
        let other_ca = Self::ca(&dir, "other");
        let p = |name: &str| dir.join(name);
        let (key, csr, crt, ext) = (
            p("server.key"),
            p("server.csr"),
            p("server.crt"),
            p("san.ext"),
        );
        std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("san.ext");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&ca),
            "-CAkey",
            s(&ca.with_extension("key")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            s(&ext),
            "-out",
            s(&crt),
        ]);
        Self {
            dir,
            ca,
            other_ca,
            server_crt: crt,
            server_key: key,
        }
    }

    fn ca(dir: &Path, name: &str) -> PathBuf {
        let crt = dir.join(format!("{name}.crt"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=outboxd test {name}"),
            "-keyout",
            s(&dir.join(format!("{name}.key"))),
            "-out",
            s(&crt),
        ]);
        crt
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A TCP proxy to `target` that keeps every byte the client sent.
struct CapturingProxy {
    addr: SocketAddr,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl CapturingProxy {
    async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let upstream = async {
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = cr.read(&mut buf).await {
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let downstream = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(upstream, downstream);
                });
            }
        });
        Self { addr, sent }
    }

    fn captured(&self) -> Vec<u8> {
        self.sent.lock().unwrap().clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A TLS server with the test certificate in front of the real broker's
/// plain listener: a broker with a TLS listener, without touching it.
struct TlsTerminator {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
}

impl TlsTerminator {
    async fn start(certs: &Certs) -> Self {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server_crt)
            .expect("server.crt")
            .collect::<Result<_, _>>()
            .expect("server.crt is PEM");
        let key = PrivateKeyDer::from_pem_file(&certs.server_key).expect("server.key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let done = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    done.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut broker) = TcpStream::connect(AMQP_HOST).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                });
            }
        });
        Self { addr, handshakes }
    }
}

fn with_rabbit_keys(cfg: &str, keys: &str) -> String {
    cfg.replace(
        "confirm_timeout = \"5s\"\n",
        &format!("confirm_timeout = \"5s\"\n{keys}"),
    )
}

fn check_blocking(cfg: String) -> tokio::task::JoinHandle<(Option<i32>, String, String)> {
    tokio::task::spawn_blocking(move || run_to_end(&["check"], &cfg))
}

/// Finding 1 of issue 8: lapin's amqps:// path fell back to plain TCP and
/// sent `PLAIN\0guest\0guest` in the clear, then said "(TLS)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_a_plain_listener_fails_and_sends_no_credentials() {
    const PASSWORD: &str = "guest";
    let proxy = CapturingProxy::start(AMQP_HOST).await;
    let db = TestDb::migrated("obx_amqps_plain").await;
    let url = format!("amqps://guest:{PASSWORD}@{}/%2f", proxy.addr);
    let cfg = config(&url, &[SourceSpec::new("orders", &db.url, "")]);

    let (code, out, err) = check_blocking(cfg.clone()).await.expect("check");
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL rabbitmq"))
        .unwrap_or_else(|| panic!("no FAIL rabbitmq line in {out}"));
    assert!(
        line.contains("TLS handshake") && line.contains("did not answer with TLS"),
        "{line}"
    );

    let relay = Relay::start(&cfg).await;
    let failure = eventually("the TLS failure in the logs", LONG, || async {
        relay
            .log_lines_with("cannot connect to rabbitmq")
            .into_iter()
            .find(|l| l["error"].as_str().is_some_and(|e| e.contains("TLS")))
    })
    .await;
    let (code, body) = relay.readyz().await;
    assert_eq!(code, 503, "never ready without the broker: {body}");
    assert_eq!(body["broker_up"], false, "{body}");
    assert!(
        relay.log_lines_with("connected to rabbitmq").is_empty(),
        "{failure}"
    );
    drop(relay);

    let sent = proxy.captured();
    assert!(!sent.is_empty(), "the client did try to connect");
    assert!(
        !contains(&sent, b"AMQP"),
        "no AMQP protocol header in the clear"
    );
    assert!(
        !contains(&sent, b"PLAIN"),
        "no PLAIN auth frame in the clear"
    );
    assert!(
        !contains(&sent, PASSWORD.as_bytes()),
        "the password never left in the clear"
    );
    // What went out was a TLS handshake: a record of type 22 (handshake).
    assert_eq!(sent[0], 0x16, "first byte {:#x}", sent[0]);
}

/// A broker with a TLS listener (here: the real one behind a terminating
/// proxy) is reached with its CA, and `check` says what it verified; with
/// an unrelated CA the handshake is refused, naming the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_verifies_the_broker_against_the_configured_ca_and_delivers() {
    let certs = Certs::new();
    let tls = TlsTerminator::start(&certs).await;
    let db = TestDb::migrated("obx_amqps_ok").await;
    let mut broker = TestBroker::new("#").await;
    let url = format!("amqps://guest:guest@{}/%2f", tls.addr);
    let base = config(
        &url,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    );
    let ca_key = |ca: &Path| format!("tls_ca_file = {:?}\n", s(ca));

    let good = with_rabbit_keys(&base, &ca_key(&certs.ca));
    let (code, out, err) = check_blocking(good.clone()).await.expect("check");
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("ok   rabbitmq"))
        .unwrap_or_else(|| panic!("no ok rabbitmq line in {out}"));
    assert!(
        line.contains(&format!(
            "TLS, certificate verified against {}",
            s(&certs.ca)
        )),
        "{line}"
    );
    assert!(tls.handshakes.load(Ordering::SeqCst) >= 1);

    let relay = Relay::start(&good).await;
    db.insert_one("OrderCreated", "", "").await;
    let got = broker
        .next(LONG)
        .await
        .expect("delivered through the TLS listener");
    assert_eq!(got.exchange, broker.exchange);
    drop(relay);

    let wrong = with_rabbit_keys(&base, &ca_key(&certs.other_ca));
    let (code, out, _) = check_blocking(wrong).await.expect("check");
    assert_eq!(code, Some(1), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL rabbitmq"))
        .unwrap_or_else(|| panic!("no FAIL rabbitmq line in {out}"));
    assert!(
        line.contains("certificate") && line.contains("UnknownIssuer"),
        "{line}"
    );
    assert!(line.contains(s(&certs.other_ca)), "{line}");

    // Without a CA file the system's roots are used, and they do not know
    // the test CA either.
    let (code, out, _) = check_blocking(base.clone()).await.expect("check");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL rabbitmq") && l.contains("system")),
        "{out}"
    );

    // Told explicitly not to verify: it connects, and says so loudly.
    let insecure = with_rabbit_keys(&base, "tls_insecure_skip_verify = true\n");
    let (code, out, _) = check_blocking(insecure).await.expect("check");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("warn rabbitmq")
            && l.contains("NOT verified")
            && l.contains("tls_insecure_skip_verify")),
        "{out}"
    );
}

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

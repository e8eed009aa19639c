//! `amqps://` against a plain listener, and against a TLS broker whose
//! certificate comes from the right or the wrong CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{Certs, LONG, check_blocking, contains, s};
use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{AMQP_HOST, eventually};

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

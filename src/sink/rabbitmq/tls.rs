//! amqps://: our own TLS handshake (rustls on ring), handed to lapin as a
//! connected stream.
//!
//! Why not lapin's own TLS: lapin's `rustls--ring` feature only picks a
//! crypto provider. The TLS code of its socket crate (`tcp-stream`) is
//! compiled in by another feature (`rustls`, `rustls-native-certs`, …,
//! which turn on `tcp-stream/rustls-futures`), and without one its
//! `into_tls` returns the plain socket, no error. So an amqps:// URL ran
//! AMQP, and the PLAIN login with the password, in clear text (issue 8,
//! finding 1). lapin is built without any TLS feature now, and amqps://
//! never reaches its TLS path: [`connect`] connects TCP, does the
//! handshake here (failing with the reason when the peer does not speak
//! TLS or its certificate is not trusted), and only then gives lapin the
//! encrypted stream through [`Connection::connector`]. A plain socket
//! cannot be built on this path at all: the runtime kit below has the TLS
//! stream as its only socket type.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_rs::traits::{Executor, Reactor, RuntimeKit};
use async_rs::util::Task;
use async_rs::{Runtime, Tokio};
use futures_core::Stream;
use futures_io::{AsyncRead, AsyncWrite};
use lapin::tcp::AsyncTcpStream;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::ServerName;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::AmqpTls;
use crate::tls::{Trust, tls_client_config};

/// TCP connect plus TLS handshake; a peer that accepts the connection and
/// then says nothing must not hold lapin's connecting thread forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the broker of an amqps:// `uri` over TLS.
pub async fn connect(
    uri: AMQPUri,
    props: ConnectionProperties,
    tls: &AmqpTls,
) -> Result<Connection, lapin::Error> {
    let client = tls
        .client
        .as_ref()
        .map(|(cert, key)| (cert.as_str(), key.as_str()));
    let config = tls_client_config(&tls.trust, client).map_err(io::Error::other)?;
    let connector = TlsConnector::from(Arc::new(config));
    let trust = tls.trust.clone();
    let runtime = Runtime::new(TlsOnly(Tokio::current()));
    let handshake = async move |uri: AMQPUri, _: Runtime<TlsOnly>| {
        let stream = handshake(&connector, &trust, &uri.authority.host, uri.authority.port).await?;
        Ok(AsyncTcpStream::Plain(stream))
    };
    let has_client_cert = tls.client.is_some();
    Connection::connector(uri, runtime, handshake, props)
        .await
        .map_err(|e| refused_by_broker(e, has_client_cert))
}

/// With TLS 1.3 the broker judges our certificate after our side of the
/// handshake is done, so its refusal arrives on lapin's first read or
/// write: as an alert, or (when its close overtakes the alert) as a reset
/// connection. Such an error gets what to do about it in front.
fn refused_by_broker(err: lapin::Error, has_client_cert: bool) -> lapin::Error {
    let text = crate::telemetry::ErrorChain(&err).to_string();
    // Our own handshake's failures are explained already (`explain`).
    let closed_after_handshake = !text.contains("TLS handshake with")
        && matches!(err.kind(), lapin::ErrorKind::IOError(e) if matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe
        ));
    let hint = if text.contains("CertificateRequired") {
        "the broker asks for a client certificate; set rabbitmq.tls_cert_file and tls_key_file"
    } else if [
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "DecryptError",
    ]
    .iter()
    .any(|alert| text.contains(alert))
    {
        "the broker refused our client certificate; is it signed by a CA the broker trusts \
         (its ssl_options.cacertfile)?"
    } else if closed_after_handshake && !has_client_cert {
        "the broker closed the connection right after the TLS handshake; if it requires \
         client certificates (ssl_options.fail_if_no_peer_cert), set rabbitmq.tls_cert_file \
         and tls_key_file"
    } else if closed_after_handshake {
        "the broker closed the connection right after the TLS handshake; does it trust our \
         client certificate (is it signed by the CA of its ssl_options.cacertfile)?"
    } else {
        return err;
    };
    lapin::Error::from(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("TLS: {hint} ({text})"),
    ))
}

async fn handshake(
    connector: &TlsConnector,
    trust: &Trust,
    host: &str,
    port: u16,
) -> io::Result<AmqpsStream> {
    let name = ServerName::try_from(host.to_owned()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name TLS can verify"),
        )
    })?;
    let steps = async {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        connector
            .connect(name, tcp)
            .await
            .map(AmqpsStream)
            .map_err(|e| explain(e, trust, host, port))
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, steps).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake with {host}:{port}: no answer within {HANDSHAKE_TIMEOUT:?}"),
        )),
    }
}

/// A handshake failure in words an operator can act on.
fn explain(err: io::Error, trust: &Trust, host: &str, port: u16) -> io::Error {
    let what = match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidMessage(_)) => format!(
            "the server did not answer with TLS ({err}); is {port} a plain AMQP port? \
             RabbitMQ's TLS listener is usually 5671"
        ),
        Some(
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertRevocationList(_),
        ) => format!(
            "the server's certificate was refused ({err}); {}",
            trust.describe().replace("verified", "checked")
        ),
        Some(_) => err.to_string(),
        None if matches!(
            err.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        ) =>
        {
            format!(
                "the server closed the connection ({err}); is {port} a plain AMQP port? \
                 RabbitMQ's TLS listener is usually 5671"
            )
        }
        None => err.to_string(),
    };
    io::Error::new(
        err.kind(),
        format!("TLS handshake with {host}:{port} failed: {what}"),
    )
}

/// The TLS stream as lapin reads and writes it (futures-io traits).
pub struct AmqpsStream(TlsStream<TcpStream>);

impl AsyncRead for AmqpsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(buf);
        match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.get_mut().0), cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for AmqpsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(Pin::new(&mut self.get_mut().0), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().0), cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().0), cx)
    }
}

/// lapin's tokio runtime kit with one change: its socket type is the TLS
/// stream. Timers, tasks and fd registration are tokio's.
#[derive(Clone, Debug)]
pub struct TlsOnly(Tokio);

impl RuntimeKit for TlsOnly {}

impl Executor for TlsOnly {
    type Task<T: Send + 'static> = <Tokio as Executor>::Task<T>;

    fn block_on<T, F: Future<Output = T>>(&self, f: F) -> T {
        self.0.block_on(f)
    }

    fn spawn<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.0.spawn(f)
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.0.spawn_blocking(f)
    }
}

impl Reactor for TlsOnly {
    type TcpStream = AmqpsStream;
    type Sleep = <Tokio as Reactor>::Sleep;

    // async-rs bounds `H` by its own (unexported) `AsSysFd`, whose
    // supertraits these are; its blanket impl covers every such `H`.
    fn register<H: Read + Write + AsFd + AsRawFd + Send + 'static>(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.0.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(&self, dur: Duration) -> impl Stream<Item = Instant> + Send + 'static {
        self.0.interval(dur)
    }

    /// Never used (the connect closure above makes every socket), and a
    /// plain socket has no place here: refuse rather than connect in clear.
    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        std::future::ready(Err(io::Error::other(format!(
            "refusing a plain TCP connection to {addr} for amqps://"
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_after_the_handshake_says_what_to_set() {
        let io = |kind, text: &str| lapin::Error::from(io::Error::new(kind, text.to_owned()));
        use io::ErrorKind::{ConnectionReset, Other, UnexpectedEof};
        // (error, client certificate configured, expected piece, or None: unchanged)
        let cases = [
            // the broker's alert when it wants a certificate and got none
            (
                io(Other, "received fatal alert: CertificateRequired"),
                false,
                Some("set rabbitmq.tls_cert_file"),
            ),
            // its alert about a certificate it does not trust
            (
                io(Other, "received fatal alert: UnknownCA"),
                true,
                Some("refused our client certificate"),
            ),
            // its close overtook the alert: without a certificate configured
            (
                io(ConnectionReset, "Connection reset by peer (os error 104)"),
                false,
                Some("if it requires client certificates"),
            ),
            // the same with one configured
            (
                io(UnexpectedEof, "unexpected end of file"),
                true,
                Some("does it trust our client certificate"),
            ),
            // our own handshake's failure is explained already
            (
                io(
                    ConnectionReset,
                    "TLS handshake with h:5671 failed: the server closed the connection",
                ),
                false,
                None,
            ),
            // anything else is left alone
            (io(Other, "no route to host"), false, None),
        ];
        for (err, has_cert, want) in cases {
            let before = crate::telemetry::ErrorChain(&err).to_string();
            let after = crate::telemetry::ErrorChain(&refused_by_broker(err, has_cert)).to_string();
            match want {
                Some(piece) => {
                    assert!(after.contains(piece), "{before}: {after}");
                    // the original reason is kept
                    assert!(after.contains(&before.replace("IO error: ", "")), "{after}");
                }
                None => assert_eq!(after, before),
            }
        }
    }
}

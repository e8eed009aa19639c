//! A TCP proxy that can cut every connection through it and refuse new ones
//! for a while (a database or broker outage without touching the shared
//! services), or blackhole them: stop forwarding without closing anything,
//! as a silent network partition does.
//!
//! A blackhole here is not a perfect partition: the kernel on both sides
//! still answers TCP keepalive probes, so only application-level timeouts
//! (AMQP heartbeats, the relay's own bounds on database steps and confirms)
//! can notice it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    target: String,
    up: AtomicBool,
    generation: Mutex<CancellationToken>,
    accepted: AtomicUsize,
    /// False while blackholed: no byte moves in either direction.
    flowing: watch::Sender<bool>,
}

impl Proxy {
    /// Starts forwarding a random local port to `target` ("host:port").
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target: target.to_owned(),
            up: AtomicBool::new(true),
            generation: Mutex::new(CancellationToken::new()),
            accepted: AtomicUsize::new(0),
            flowing: watch::Sender::new(true),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !s.up.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let cut = s.generation.lock().unwrap().clone();
                let target = s.target.clone();
                let flowing = s.flowing.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (client_r, client_w) = client.into_split();
                    let (server_r, server_w) = server.into_split();
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = pump(client_r, server_w, flowing.clone()) => {}
                        _ = pump(server_r, client_w, flowing) => {}
                    }
                });
            }
        });
        Self { addr, shared }
    }

    /// Closes every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
        let mut g = self.shared.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    /// Ends a cut or a blackhole: new connections are forwarded, and
    /// blackholed ones carry on where they stopped.
    pub fn restore(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
        self.shared.flowing.send_replace(true);
    }

    /// Stops forwarding on every connection, open or new, without closing
    /// any, until [`Proxy::restore`]. New connections are accepted (the
    /// kernel completes the handshake anyway) and hang.
    pub fn blackhole(&self) {
        self.shared.flowing.send_replace(false);
    }

    /// Connections accepted (and forwarded) so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

/// Copies one direction, holding every read (data, end of stream or error)
/// while the proxy is blackholed, so nothing gets through, not even a close.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if flowing.wait_for(|f| *f).await.is_err() {
            return;
        }
        let n = from.read(&mut buf).await;
        if flowing.wait_for(|f| *f).await.is_err() {
            return;
        }
        match n {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

//! A TCP proxy that can cut every connection through it and refuse new ones
//! for a while: a database or broker outage without touching the shared
//! services.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
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
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
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

    pub fn restore(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
    }

    /// Connections accepted (and forwarded) so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

//! A TCP proxy between the relay and RabbitMQ, so the recovery run can cut
//! the relay's broker connections and refuse new ones for a while without
//! stopping the RabbitMQ that everything else on the machine shares.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

#[derive(Default)]
struct State {
    down: bool,
    links: Vec<AbortHandle>,
}

pub struct Proxy {
    port: u16,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves nothing half-done in State.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: &'static str) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("proxy: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("proxy: {e}"))?
            .port();
        let state: Arc<Mutex<State>> = Arc::default();
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // e.g. out of file descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Deciding and registering under one lock: a link opened
                // while `stop` runs is either refused or cut by it.
                let mut s = lock(&shared);
                if s.down {
                    // Dropping the socket closes it: the relay sees a refusal.
                    continue;
                }
                s.links.retain(|l| !l.is_finished());
                s.links
                    .push(tokio::spawn(link(client, target)).abort_handle());
            }
        });
        Ok(Self {
            port,
            state,
            accept,
        })
    }

    /// The broker URL that goes through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Closes every proxied connection and refuses new ones until `resume`.
    pub fn stop(&self) {
        let mut s = lock(&self.state);
        s.down = true;
        for l in s.links.drain(..) {
            // Dropping the task drops both sockets: the relay's connection closes.
            l.abort();
        }
    }

    pub fn resume(&self) {
        lock(&self.state).down = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.stop();
    }
}

async fn link(mut client: TcpStream, target: &str) {
    let Ok(mut broker) = TcpStream::connect(target).await else {
        return;
    };
    // AMQP frames are small and latency counts: no Nagle on either leg.
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
}

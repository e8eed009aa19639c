//! The admin server's connections, bounded: at most [`MAX_CONNECTIONS`]
//! open at once, and each one closed after [`IDLE_TIMEOUT`] without a byte
//! in either direction (a request header that trickles in included).
//!
//! Without these bounds every idle socket held one of our file descriptors
//! for as long as the peer liked: a few hundred of them made `/healthz` time
//! out and the source pools fail with "Too many open files".
//!
//! At the limit, a new connection is accepted and the open connection that
//! has gone longest without a byte is closed to make room for it. A probe
//! sends its request as soon as it connects, so it is the last one picked.
//! The newcomer's descriptor is the only one above the limit, and only until
//! the closed connection has let go of its own. Measured with 300 idle sockets
//! opened before a `/healthz` request (tests/integration/admin.rs):
//! - leaving new connections in the kernel's backlog until a slot frees:
//!   `/healthz` answered after 17.6 s, the last idle socket was closed after
//!   50 s (five rounds of the idle timeout);
//! - accepting and closing new connections at once: `/healthz` was refused
//!   for 9 s, until the held idle sockets timed out;
//! - closing the least active one, as here: `/healthz` answered in under
//!   5 ms, and the relay held 63 more descriptors than before the sockets.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// Most connections open at once: far more than a kubelet and a scraper use.
pub const MAX_CONNECTIONS: usize = 64;

/// A connection with no byte read or written for this long is closed. A
/// scraper's keep-alive connection idle between scrapes is closed too, and
/// it simply reconnects at the next scrape.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new connection waits for the one closed to make room for it.
/// The closed one only has to notice (its task is woken at once), so this is
/// a safety net: past it, the newcomer is dropped rather than the accept
/// loop stalled.
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// A [`TcpListener`] that keeps its connections within the bounds above.
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    /// Every connection handed out, to pick one to close; dead ones are
    /// pruned at each accept.
    open: Vec<Weak<Activity>>,
    epoch: Instant,
}

impl BoundedListener {
    pub fn new(inner: TcpListener) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            open: Vec::with_capacity(MAX_CONNECTIONS + 1),
            epoch: Instant::now(),
        }
    }

    /// Closes the open connection that has gone longest without a byte.
    fn close_least_active(&mut self) {
        self.open.retain(|weak| weak.strong_count() > 0);
        let oldest = self
            .open
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|a| !a.closing.load(Ordering::SeqCst))
            .min_by_key(|a| a.last_ms.load(Ordering::Relaxed));
        if let Some(activity) = oldest {
            activity.close();
        }
    }
}

impl Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's own accept for a TcpListener: it retries on errors and
            // backs off when the process is out of descriptors.
            let (io, addr) = Listener::accept(&mut self.inner).await;
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    self.close_least_active();
                    let room =
                        tokio::time::timeout(ROOM_WAIT, self.permits.clone().acquire_owned()).await;
                    match room {
                        Ok(Ok(permit)) => permit,
                        // The semaphore is never closed; a timeout means
                        // the closed connection has not let go yet.
                        _ => {
                            debug!(peer = %addr, "admin connection dropped: no room");
                            continue;
                        }
                    }
                }
            };
            let activity = Arc::new(Activity {
                last_ms: AtomicU64::new(millis_since(self.epoch)),
                closing: AtomicBool::new(false),
                waker: Mutex::new(None),
            });
            self.open.retain(|weak| weak.strong_count() > 0);
            self.open.push(Arc::downgrade(&activity));
            let stream = BoundedStream {
                io,
                epoch: self.epoch,
                idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                activity,
                _permit: permit,
            };
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What the listener knows of one open connection.
struct Activity {
    /// Milliseconds since the listener's epoch at the last byte either way.
    last_ms: AtomicU64,
    /// Set when the listener closes it to make room.
    closing: AtomicBool,
    /// The connection task's waker, to make it notice `closing`.
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let waker = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One admin connection: a [`TcpStream`] that fails its reads and writes
/// once it has been idle too long or closed to make room, so the HTTP
/// server drops it (and its descriptor and permit with it).
pub struct BoundedStream {
    io: TcpStream,
    epoch: Instant,
    activity: Arc<Activity>,
    /// Fires at the idle deadline, as of the last time it was checked.
    idle: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl BoundedStream {
    /// Why this connection must end now, if it must; registers the task to
    /// be woken when that changes.
    fn must_end(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        {
            let mut waker = self
                .activity
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        // Read after the waker is stored: a close that lands in between
        // either is seen here or wakes the waker just stored.
        if self.activity.closing.load(Ordering::SeqCst) {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection",
            ));
        }
        // The timer is moved only when it fires: bytes push the deadline
        // through `last_ms`, not through a timer reset per read or write.
        while self.idle.as_mut().poll(cx).is_ready() {
            let last = Duration::from_millis(self.activity.last_ms.load(Ordering::Relaxed));
            let deadline = self.epoch + last + IDLE_TIMEOUT;
            if deadline <= Instant::now() {
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no byte either way within the idle timeout",
                ));
            }
            self.idle.as_mut().reset(deadline);
        }
        None
    }

    fn touch(&self) {
        self.activity
            .last_ms
            .store(millis_since(self.epoch), Ordering::Relaxed);
    }
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(err) = this.must_end(cx) {
            return Poll::Ready(Err(err));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.touch();
        }
        result
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(err) = this.must_end(cx) {
            return Poll::Ready(Err(err));
        }
        let result = Pin::new(&mut this.io).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(err) = this.must_end(cx) {
            return Poll::Ready(Err(err));
        }
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

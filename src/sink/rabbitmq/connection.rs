//! One AMQP connection for the whole process, kept up by a supervisor task.
//!
//! lapin's own auto-recovery is young, so we reconnect ourselves: the
//! supervisor connects with backoff, publishes the live connection through a
//! `watch` channel, and drops it as soon as lapin reports an error, the
//! connection stops being connected, or a publisher nudges it after a
//! failure. Sources never claim rows while no connection is published, so a
//! broker outage costs no database work and no retry attempts. With several
//! node URLs, a lost connection is replaced by one to the next node that
//! answers ([`Rotation`]), with the same backoff once every node has failed.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_core::Stream;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::nodes::Rotation;
use crate::backoff::Backoff;
use crate::config::{AmqpTls, RabbitConfig, RabbitNode};
use crate::metrics::BrokerMetrics;
use crate::telemetry::ErrorChain;
use crate::tls::Trust;

/// Reconnect delays: quick first retry, then at most every 30 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
/// A connect that takes longer than this is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat asked for when the URL does not set one: a silently dead peer
/// (a cut cable, a frozen proxy) is noticed within about twice this.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// How often the supervisor double-checks the connection state on its own.
const STATUS_CHECK: Duration = Duration::from_secs(1);

/// What sources need to know about the broker.
#[derive(Clone, Default)]
struct State {
    connection: Option<Arc<Connection>>,
    /// The broker has blocked publishing (resource alarm).
    blocked: bool,
}

pub struct Broker {
    config: RabbitConfig,
    current: watch::Sender<State>,
    nudge: Notify,
    /// A connection a publisher gave up on ([`Broker::abandon`]).
    abandoned: Mutex<Weak<Connection>>,
    metrics: BrokerMetrics,
}

impl Broker {
    pub fn new(config: RabbitConfig, metrics: BrokerMetrics) -> Arc<Self> {
        metrics.up.set(0);
        metrics.blocked.set(0);
        Arc::new(Self {
            config,
            current: watch::Sender::new(State::default()),
            nudge: Notify::new(),
            abandoned: Mutex::new(Weak::new()),
            metrics,
        })
    }

    /// Drops `conn` if it is still the connection in use: rabbitmq did not
    /// answer on it within the confirm timeout. With heartbeats on, lapin
    /// finds a connection that died silently within two of them; with
    /// `heartbeat=0` nothing else would ever end the wait. The watcher
    /// reconnects (trying the next node first, if there are several).
    pub fn abandon(&self, conn: &Arc<Connection>) {
        *self
            .abandoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(conn);
        self.nudge.notify_one();
    }

    /// Whether a publisher gave up on `conn` (and forgets that it did).
    fn take_abandoned(&self, conn: &Arc<Connection>) -> bool {
        let mut abandoned = self
            .abandoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let this = std::ptr::eq(abandoned.as_ptr(), Arc::as_ptr(conn));
        if this {
            *abandoned = Weak::new();
        }
        this
    }

    /// Connects once to `node`, without retrying (used by `check` and by
    /// the supervisor).
    pub async fn connect(
        config: &RabbitConfig,
        node: &RabbitNode,
    ) -> Result<Connection, lapin::Error> {
        // The URL was validated when the config loaded; parse errors cannot
        // happen here, but are mapped rather than unwrapped all the same.
        let mut uri: AMQPUri = node
            .url
            .expose()
            .parse()
            .map_err(|_| lapin::Error::from(std::io::Error::other("invalid AMQP URL")))?;
        match uri.query.heartbeat {
            None => uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS),
            // The heartbeat is what ends a broker connection that died
            // silently (a network partition, a frozen node): without it a
            // batch can wait on a broker RPC for as long as the TCP
            // connection is not reset, and nothing flows meanwhile.
            Some(0) => warn!(
                node = %node.display,
                "the rabbitmq URL sets heartbeat=0: a broker connection that dies silently is then never detected, and publishing can stall until the process restarts; leave heartbeat out (10 s) or set it above 0"
            ),
            Some(_) => {}
        }
        let props = ConnectionProperties::default()
            .with_connection_name(config.connection_name.clone().into());
        // The scheme decides, not the settings: an amqps:// URL is never
        // connected without TLS, even if its settings were somehow absent
        // (then the system's roots are trusted).
        let connect: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
            match uri.scheme {
                AMQPScheme::AMQPS => {
                    let tls = config.tls.clone().unwrap_or(AmqpTls {
                        trust: Trust::SystemRoots,
                        client: None,
                    });
                    Box::pin(async move { super::tls::connect(uri, props, &tls).await })
                }
                AMQPScheme::AMQP => {
                    let runtime = lapin::runtime::default_runtime()?;
                    Box::pin(Connection::connect_uri_with_runtime(uri, props, runtime))
                }
            };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            ))),
        }
    }

    /// The live connection, if there is one.
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.current.borrow().connection.clone()
    }

    /// Connected (possibly blocked).
    pub fn is_up(&self) -> bool {
        self.current.borrow().connection.is_some()
    }

    /// Connected and not blocked by a resource alarm: new batches may start.
    pub fn can_publish(&self) -> bool {
        let s = self.current.borrow();
        s.connection.is_some() && !s.blocked
    }

    /// Waits until [`Broker::can_publish`] (or `stop` fires).
    pub async fn wait_publishable(&self, stop: &CancellationToken) {
        let mut rx = self.current.subscribe();
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = rx.wait_for(|s| s.connection.is_some() && !s.blocked) => {}
        }
    }

    fn set_blocked(&self, blocked: bool) {
        self.metrics.blocked.set(i64::from(blocked));
        self.current.send_modify(|s| s.blocked = blocked);
    }

    fn set_connection(&self, connection: Option<Arc<Connection>>) {
        self.metrics.up.set(i64::from(connection.is_some()));
        self.metrics.blocked.set(0);
        self.current.send_replace(State {
            connection,
            blocked: false,
        });
    }

    /// Tells the supervisor that something failed on the connection, so it
    /// re-checks at once instead of at its next periodic check.
    pub fn report_failure(&self) {
        self.nudge.notify_one();
    }

    /// Keeps a connection up until `stop` fires, then closes it cleanly.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if let Some(tls) = &self.config.tls
            && tls.trust == Trust::Anyone
        {
            warn!(
                broker = %self.config.display,
                "rabbitmq TLS certificate verification is OFF (tls_insecure_skip_verify = true): \
                 the connection is encrypted, but anyone on the network path can pose as the broker \
                 and read the credentials; set tls_ca_file instead"
            );
        }
        let nodes = &self.config.nodes;
        let mut rotation = Rotation::new(nodes.len());
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let i = rotation.node();
            // `Rotation` keeps its index below the length of a list the
            // config never leaves empty; stop rather than panic all the same.
            let Some(node) = nodes.get(i) else {
                error!(
                    node = i + 1,
                    nodes = nodes.len(),
                    "no such rabbitmq node; the broker connection stops"
                );
                break;
            };
            let attempt = tokio::select! {
                _ = stop.cancelled() => break,
                r = Self::connect(&self.config, node) => r,
            };
            match attempt {
                Ok(conn) => {
                    failures = 0;
                    rotation.connected();
                    self.metrics.connects.inc();
                    info!(
                        broker = %self.config.describe_node(i),
                        node = i + 1,
                        nodes = nodes.len(),
                        "connected to rabbitmq"
                    );
                    self.watch(Arc::new(conn), node, &stop).await;
                    rotation.lost();
                }
                Err(err) => {
                    let back_off = rotation.failed();
                    if !back_off {
                        warn!(
                            broker = %node.display,
                            error = %ErrorChain(&err),
                            node = i + 1,
                            nodes = nodes.len(),
                            "cannot connect to this rabbitmq node; trying the next one"
                        );
                        continue;
                    }
                    failures += 1;
                    let delay = RECONNECT.jittered(failures);
                    warn!(
                        broker = %node.display,
                        error = %ErrorChain(&err),
                        attempt = failures,
                        retry_in = ?delay,
                        "cannot connect to rabbitmq"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.metrics.up.set(0);
    }

    /// Publishes `conn` and returns when it has failed (or on `stop`, after closing it).
    async fn watch(&self, conn: Arc<Connection>, node: &RabbitNode, stop: &CancellationToken) {
        let mut events = Box::pin(conn.events_listener());
        self.set_connection(Some(conn.clone()));
        let mut ticker = tokio::time::interval(STATUS_CHECK);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.set_connection(None);
                    if let Err(err) = conn.close(200, "outboxd shutting down".into()).await {
                        warn!(error = %ErrorChain(&err), "closing the rabbitmq connection failed");
                    }
                    return;
                }
                event = poll_fn(|cx| events.as_mut().poll_next(cx)) => match event {
                    // lapin reports a channel the broker closed (a refused
                    // publish, a missing exchange) as an error event too;
                    // only a connection that is gone means reconnecting.
                    Some(Event::Error(err)) if conn.status().connected() => {
                        debug!(broker = %node.display, error = %ErrorChain(&err), "rabbitmq closed a channel; the connection stays");
                    }
                    Some(Event::Error(err)) => {
                        warn!(broker = %node.display, error = %ErrorChain(&err), "rabbitmq connection failed; reconnecting");
                        break;
                    }
                    Some(Event::ConnectionBlocked(reason)) => {
                        self.set_blocked(true);
                        warn!(%reason, "rabbitmq blocked publishing (resource alarm); no new batches until it clears");
                    }
                    Some(Event::ConnectionUnblocked) => {
                        self.set_blocked(false);
                        info!("rabbitmq unblocked publishing");
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = self.nudge.notified() => {
                    if self.take_abandoned(&conn) {
                        warn!(broker = %node.display, "rabbitmq did not answer on this connection within the confirm timeout; dropping it and reconnecting");
                        // Closing waits for the broker's answer, which may
                        // never come; bounded, in the background.
                        tokio::spawn(async move {
                            let closing = conn.close(320, "outboxd: no answer in time".into());
                            let _ = tokio::time::timeout(CONNECT_TIMEOUT, closing).await;
                        });
                        break;
                    }
                    if !conn.status().connected() {
                        warn!(broker = %node.display, "rabbitmq connection is gone; reconnecting");
                        break;
                    }
                }
                _ = ticker.tick() => {
                    if !conn.status().connected() {
                        warn!(broker = %node.display, "rabbitmq connection is gone; reconnecting");
                        break;
                    }
                }
            }
        }
        self.set_connection(None);
    }
}

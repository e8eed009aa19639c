//! The replication connection, behind our own small [`WalStream`] trait so
//! the transport crate (pgwire-replication, whose API changes between
//! minor versions) can be swapped without touching the relay.
//!
//! What the relay relies on: events in commit order, a transaction's
//! Begin before its changes and its Commit after them; [`WalStream::ack`]
//! only ever moves forward; the stream always starts where the slot's
//! `confirmed_flush` is (we never send a start position: one past
//! `confirmed_flush` skips transactions for good).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};

use crate::config::{SourceConfig, WalCapture};
use crate::tls::PgTls;

/// How often the slot's position is reported to the server when it moved.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Events the transport reads ahead of the relay. With the relay's own
/// bound (one batch), this bounds what a large transaction holds in
/// memory: at most this many changes plus one batch.
pub const READ_AHEAD: usize = 2048;

/// One event of the stream, in the order the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A transaction starts; `final_lsn` is its commit record's position.
    Begin {
        final_lsn: u64,
        xid: u32,
        commit_time_micros: i64,
    },
    /// A pgoutput change (Relation, Insert, …) for [`super::decode`].
    Change(Bytes),
    /// A logical message (`pg_logical_emit_message`).
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
    /// The transaction ends; acknowledging `end_lsn` means it is done.
    Commit { end_lsn: u64 },
    /// The server's send position while it has nothing for us.
    KeepAlive { wal_end: u64 },
}

/// Why the stream could not start or ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Another session streams from the slot (a relay beside us).
    #[error("the replication slot is in use by another session: {0}")]
    SlotBusy(String),
    /// The slot does not exist (never made, dropped, or lost in a failover).
    #[error("the replication slot does not exist: {0}")]
    SlotMissing(String),
    /// The slot can no longer be used: the WAL it needs was removed
    /// (`max_slot_wal_keep_size`).
    #[error("the replication slot is invalidated: {0}")]
    SlotLost(String),
    #[error("{0}")]
    Other(String),
}

impl StreamError {
    fn classify(err: &PgWireError) -> Self {
        let text = err.to_string();
        if text.contains("SQLSTATE 55006") {
            StreamError::SlotBusy(text)
        } else if text.contains("replication slot") && text.contains("does not exist") {
            StreamError::SlotMissing(text)
        } else if text.contains("can no longer get changes")
            || text.contains("has been invalidated")
        {
            StreamError::SlotLost(text)
        } else {
            StreamError::Other(text)
        }
    }
}

/// A started logical replication stream.
pub trait WalStream: Send + 'static {
    /// The next event; `Ok(None)` once the stream ended after [`stop`](Self::stop).
    fn recv(&mut self) -> impl Future<Output = Result<Option<Event>, StreamError>> + Send;
    /// Everything up to `lsn` is done: the slot may move there.
    fn ack(&self, lsn: u64);
    /// The last position actually sent to the server.
    fn acked_on_server(&self) -> u64;
    /// Ends the stream cleanly (CopyDone).
    fn stop(&self);
}

/// pgwire-replication's client.
pub struct PgStream {
    client: ReplicationClient,
}

impl PgStream {
    /// Connects and starts streaming from the slot's `confirmed_flush`;
    /// returns once the server has accepted START_REPLICATION (the slot is
    /// ours from then on).
    pub async fn start(config: &SourceConfig, wal: &WalCapture) -> Result<Self, StreamError> {
        let db = &config.database;
        let host = db
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".to_owned());
        let port = db.get_ports().first().copied().unwrap_or(5432);
        let user = db.get_user().unwrap_or("postgres").to_owned();
        let password = db
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let dbname = db.get_dbname().unwrap_or(&user).to_owned();
        // The same TLS as the source's other connections. verify-full
        // checks the host name (or IP) against the certificate; without
        // sslrootcert the roots are webpki-roots' (Mozilla's), not the
        // system's.
        let tls = match &config.tls {
            PgTls::Off => TlsConfig::disabled(),
            PgTls::Require => TlsConfig::require(),
            PgTls::VerifyFull { ca_file } => {
                TlsConfig::verify_full(ca_file.as_ref().map(PathBuf::from))
                    .with_sni_hostname(host.clone())
            }
        };
        let cfg = ReplicationConfig::new(
            host,
            user,
            password,
            dbname,
            wal.slot.clone(),
            wal.publication.as_str(),
        )
        .with_port(port)
        .with_tls(tls)
        // Never a stored position: the server resumes at confirmed_flush.
        .with_start_lsn(Lsn::ZERO)
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(STATUS_INTERVAL)
        .with_buffer_size(READ_AHEAD)
        // created_at as text we can read: ISO, in UTC.
        .with_options("-c datestyle=ISO -c timezone=UTC")
        .with_application_name(format!("outboxd {}", config.name));
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| StreamError::classify(&e))?;
        client
            .wait_started()
            .await
            .map_err(|e| StreamError::classify(&e))?;
        Ok(Self { client })
    }
}

impl WalStream for PgStream {
    async fn recv(&mut self) -> Result<Option<Event>, StreamError> {
        loop {
            let event = match self.client.recv().await {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(None),
                Err(e) => return Err(StreamError::classify(&e)),
            };
            return Ok(Some(match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => Event::Begin {
                    final_lsn: final_lsn.as_u64(),
                    xid,
                    commit_time_micros,
                },
                ReplicationEvent::XLogData { data, .. } => Event::Change(data),
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => Event::Message {
                    transactional,
                    lsn: lsn.as_u64(),
                    prefix,
                    content,
                },
                ReplicationEvent::Commit { end_lsn, .. } => Event::Commit {
                    end_lsn: end_lsn.as_u64(),
                },
                ReplicationEvent::KeepAlive { wal_end, .. } => Event::KeepAlive {
                    wal_end: wal_end.as_u64(),
                },
                // We never set a stop position.
                ReplicationEvent::StoppedAt { .. } => continue,
            }));
        }
    }

    fn ack(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }

    fn acked_on_server(&self) -> u64 {
        self.client.metrics().last_applied_lsn().as_u64()
    }

    fn stop(&self) {
        self.client.stop();
    }
}

/// An LSN as PostgreSQL prints it (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

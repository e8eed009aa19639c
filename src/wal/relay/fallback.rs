//! While the slot is missing or lost: the table is polled (and sent) until
//! the slot is back, and a paused source waits without a replication
//! connection.

use super::*;

/// How polling the table while the slot is gone ended.
pub(super) enum Fallback {
    /// The slot exists and is usable again: stream.
    SlotBack,
    Drained,
    Aborted(usize),
    Failed(SessionError),
}

/// The stream while there is none (polling): nothing to acknowledge.
pub(super) struct NoStream;

impl WalStream for NoStream {
    async fn recv(&mut self) -> Result<Option<Event>, StreamError> {
        std::future::pending().await
    }
    fn ack(&self, _lsn: u64) {}
    fn acked_on_server(&self) -> u64 {
        u64::MAX
    }
    fn stop(&self) {}
}

impl<P: Publisher> WalRelay<P> {
    /// While the slot is missing or lost: send what the table holds, in
    /// id order, every poll interval (one relay of the source at a time,
    /// under an advisory lock), until the slot is usable again. Rows are
    /// deleted (or marked) before the next pass reads the table, so a pass
    /// repeats nothing the previous one delivered.
    pub(super) async fn fallback(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
        deletes: &Deletes,
    ) -> Fallback {
        let name = &self.config.name;
        self.health.set_polling(true);
        if let Some(g) = &self.polling {
            g.set(1);
        }
        warn!(source = %name, slot = %self.wal.slot, "polling the outbox table while the replication slot is unusable");
        let ended = loop {
            self.health.beat();
            if self.health.paused() {
                tokio::select! {
                    _ = drain.cancelled() => break Fallback::Drained,
                    _ = abort.cancelled() => break Fallback::Aborted(0),
                    _ = tokio::time::sleep(self.config.poll_interval) => continue,
                }
            }
            match self.poll_pass(drain, abort, deletes).await {
                Ok(Some(end)) => {
                    break match end {
                        End::Drained => Fallback::Drained,
                        End::Aborted(n) => Fallback::Aborted(n),
                        // Paused mid-pass: the next pass (after resume) goes on.
                        End::Paused => continue,
                    };
                }
                Ok(None) => {}
                Err(e) => break Fallback::Failed(e),
            }
            tokio::select! {
                _ = drain.cancelled() => break Fallback::Drained,
                _ = abort.cancelled() => break Fallback::Aborted(0),
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
            match self.slot_usable().await {
                Ok(true) => break Fallback::SlotBack,
                Ok(false) => {}
                Err(e) => break Fallback::Failed(e.into()),
            }
        };
        self.health.set_polling(false);
        if let Some(g) = &self.polling {
            g.set(0);
        }
        if matches!(ended, Fallback::SlotBack) {
            info!(source = %name, slot = %self.wal.slot, "the replication slot is back: streaming again");
        }
        ended
    }

    /// One pass over the table, if no other relay of the source polls it.
    pub(super) async fn poll_pass(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
        deletes: &Deletes,
    ) -> Result<Option<End>, SessionError> {
        // A connection of its own: the lock goes with it, whatever happens.
        let lock = tokio::time::timeout(DB_TIMEOUT, crate::source::connect(&self.config))
            .await
            .map_err(|_| DbError::TimedOut {
                step: "connect to poll the table",
            })?
            .map_err(|e| DbError::Failed {
                step: "connect to poll the table",
                source: Box::new(e),
            })?;
        let key = format!("outboxd wal polling {}", self.config.table);
        let got: bool = step(
            "take the polling lock",
            lock.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key]),
        )
        .await?
        .get(0);
        if !got {
            return Ok(None);
        }
        let mut st = State::new(deletes.clone());
        let ended = self.snapshot(&mut st, &NoStream, drain, abort).await;
        // Every delete of this pass done before the next pass reads.
        self.flush_deletes(deletes).await;
        drop(lock);
        ended
    }

    /// Whether the slot exists and can be streamed from.
    pub(super) async fn slot_usable(&self) -> Result<bool, DbError> {
        let client = step("take a connection", self.pool.get()).await?;
        let row = step(
            "look for the slot",
            client.query_opt(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                &[&self.wal.slot],
            ),
        )
        .await?;
        Ok(match row {
            None => false,
            Some(r) => !matches!(
                r.try_get::<_, Option<String>>(0).ok().flatten().as_deref(),
                Some("lost")
            ),
        })
    }

    /// Paused: no replication connection until the source is resumed (or
    /// the relay stops). `Some` if the relay stops meanwhile.
    pub(super) async fn wait_resumed(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Option<End> {
        let mut paused = self.health.paused_changes();
        info!(source = %self.config.name, slot = %self.wal.slot, "paused: replication connection closed; the slot keeps the WAL from its position until `outboxd resume`");
        while *paused.borrow_and_update() {
            // /healthz: a paused loop still turns.
            self.health.beat();
            tokio::select! {
                _ = drain.cancelled() => return Some(End::Drained),
                _ = abort.cancelled() => return Some(End::Aborted(0)),
                _ = paused.changed() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
        None
    }
}

//! Deleting (or marking) delivered rows: one long-lived task per relay,
//! fed by an unbounded queue, so publishing never waits for the database.

use super::*;

/// Work for the task that deletes (or marks) delivered rows.
pub(super) enum Job {
    Delete(Vec<i64>),
    /// Answered once every delete queued before it has run (or was given up).
    Flush(oneshot::Sender<()>),
}

/// Where a session queues deletes. Unbounded on purpose: publishing must
/// not wait for the database, or a PostgreSQL shutdown (which waits for
/// the relay to confirm everything its walsender sent) and a relay waiting
/// for deletes the shutting-down server refuses would wait on each other.
/// It holds one id (8 bytes) per delivered row not yet deleted.
pub(super) type Deletes = mpsc::UnboundedSender<Job>;

/// How often rows a delete did not find are looked for again, and how many
/// times: the stream can bring a transaction as soon as its commit record
/// is flushed, a moment before the committing session makes it visible to
/// others, so a fast confirm can send the DELETE before the row is there.
pub(super) const LATE_RETRY: Duration = Duration::from_millis(100);
pub(super) const LATE_TRIES: u32 = 30;

/// Deletes (or marks) delivered rows, merging what queued up meanwhile.
/// Rows the statement did not find are tried again a few times (see
/// [`LATE_RETRY`]). A failed statement (the database may be restarting) is
/// retried until the relay stops; what is left then stays in the table and
/// is sent again after a restart.
pub(super) async fn delete_confirmed(
    pool: Pool,
    sql: String,
    mut rx: mpsc::UnboundedReceiver<Job>,
    metrics: SourceMetrics,
    name: String,
) {
    let mut failures = 0u32;
    let mut flushes = Vec::new();
    // (id, statements that did not find it)
    let mut late: Vec<(i64, u32)> = Vec::new();
    let mut closed = false;
    loop {
        let first = if closed {
            if late.is_empty() {
                return;
            }
            tokio::time::sleep(LATE_RETRY).await;
            None
        } else if late.is_empty() {
            match rx.recv().await {
                Some(job) => Some(job),
                None => return,
            }
        } else {
            match tokio::time::timeout(LATE_RETRY, rx.recv()).await {
                Ok(Some(job)) => Some(job),
                Ok(None) => {
                    closed = true;
                    None
                }
                Err(_) => None,
            }
        };
        let mut fresh = Vec::new();
        let mut next = first;
        // Everything queued up to the first flush goes in one statement.
        while let Some(job) = next.take() {
            match job {
                Job::Delete(more) => fresh.extend(more),
                Job::Flush(done) => {
                    flushes.push(done);
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        let ids: Vec<i64> = fresh
            .iter()
            .copied()
            .chain(late.iter().map(|(id, _)| *id))
            .collect();
        while !ids.is_empty() {
            let done = async {
                let client = step("take a connection", pool.get()).await?;
                step("delete delivered rows", client.query(&sql, &[&ids])).await
            }
            .await;
            match done {
                Ok(rows) => {
                    failures = 0;
                    let found: HashSet<i64> =
                        rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
                    let mut still = Vec::new();
                    for (id, tries) in fresh.iter().map(|id| (*id, 0)).chain(late.drain(..)) {
                        if found.contains(&id) {
                            continue;
                        }
                        if tries + 1 >= LATE_TRIES {
                            debug!(source = %name, row_id = id, "a delivered row was not found to delete (deleted by someone else, or parked)");
                        } else {
                            still.push((id, tries + 1));
                        }
                    }
                    late = still;
                    break;
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    metrics.error(SourceError::Database).inc();
                    warn!(source = %name, rows = ids.len(), error = %ErrorChain(&err), "removing delivered rows failed; retrying (until then they would be sent again after a restart)");
                    if rx.is_closed() && failures > 3 {
                        warn!(source = %name, rows = ids.len(), "giving up removing delivered rows at shutdown; they are sent again after a restart");
                        late.clear();
                        break;
                    }
                    let delay = Duration::from_millis(200).saturating_mul(failures.min(25));
                    tokio::time::sleep(delay).await;
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

impl<P: Publisher> WalRelay<P> {
    /// Waits (at most `DB_TIMEOUT`) until every queued delete has run.
    pub(super) async fn flush_deletes(&self, deletes: &Deletes) {
        let (done, flushed) = oneshot::channel();
        if deletes.send(Job::Flush(done)).is_ok()
            && tokio::time::timeout(DB_TIMEOUT, flushed).await.is_err()
        {
            warn!(source = %self.config.name, "deletes of delivered rows are behind; reading the table may send some of them again");
        }
    }
}

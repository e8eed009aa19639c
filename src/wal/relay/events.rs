//! The stream's events: transactions into the queue of pending messages,
//! commits into the ledger, and the slot moved past what is done.

use super::*;

impl<P: Publisher> WalRelay<P> {
    /// One event of the stream.
    pub(super) fn handle<S: WalStream>(
        &self,
        st: &mut State,
        stream: &S,
        event: Option<Event>,
    ) -> Result<(), SessionError> {
        let Some(event) = event else {
            return Err(
                StreamError::Other("the server ended the replication stream".into()).into(),
            );
        };
        match event {
            Event::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                if final_lsn >= st.snapshot_lsn && !st.skip.is_empty() {
                    st.skip = HashSet::new();
                }
                st.txn = Some(Txn {
                    seq: st.ledger.begin(),
                    commit_lsn: final_lsn,
                    commit_time: row::pg_time(commit_time_micros),
                    ordinal: 0,
                    read_before: st.read_before.as_ref().is_some_and(|s| s.saw(xid)),
                });
            }
            Event::Change(data) => {
                let Change::Insert(ins) = st.decoder.decode(&data)? else {
                    return Ok(());
                };
                let table = &self.config.table;
                if ins.schema != table.schema || ins.table != table.table {
                    return Ok(());
                }
                let Some(txn) = &st.txn else {
                    return Err(StreamError::Other("an insert outside a transaction".into()).into());
                };
                let row = row::from_insert(&ins, txn.commit_time);
                // Either way the table read sent it, or it had been sent
                // (and deleted) before: a slot whose position went back (a
                // crash, PostgreSQL < 17 restarting) repeats those.
                if st.skip.remove(&row.id) || txn.read_before {
                    return Ok(());
                }
                st.ledger.add(txn.seq);
                st.pending.push_back(Item::new(row, Some(txn.seq), true));
            }
            Event::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix != MESSAGE_PREFIX {
                    return Ok(());
                }
                let (seq, row) = match (&mut st.txn, transactional) {
                    (Some(txn), true) => {
                        let row = row::from_message(
                            &content,
                            txn.commit_lsn,
                            txn.ordinal,
                            txn.commit_time,
                        );
                        txn.ordinal += 1;
                        (txn.seq, row)
                    }
                    _ => {
                        // A non-transactional message is a transaction of its own.
                        let seq = st.ledger.begin();
                        st.ledger.commit(seq, lsn);
                        (seq, row::from_message(&content, lsn, 0, SystemTime::now()))
                    }
                };
                st.ledger.add(seq);
                st.pending.push_back(Item::new(row, Some(seq), false));
            }
            Event::Commit { end_lsn } => {
                if let Some(txn) = st.txn.take() {
                    st.ledger.commit(txn.seq, end_lsn);
                }
                self.move_slot(st, stream);
            }
            Event::KeepAlive { wal_end } => {
                if st.ledger.is_empty()
                    && st.txn.is_none()
                    && st.pending.is_empty()
                    && wal_end > st.acked
                {
                    st.acked = wal_end;
                    stream.ack(wal_end);
                }
            }
        }
        Ok(())
    }

    pub(super) fn move_slot<S: WalStream>(&self, st: &mut State, stream: &S) {
        if let Some(lsn) = st.ledger.advance()
            && lsn > st.acked
        {
            st.acked = lsn;
            stream.ack(lsn);
        }
    }

    /// Before the session ends: the last acknowledgement, and a bounded
    /// wait until the server has it (the transport sends it on its own
    /// schedule, and not at all once stopped).
    pub(super) async fn settle_slot<S: WalStream>(&self, st: &mut State, stream: &S) {
        self.move_slot(st, stream);
        let deadline = Instant::now() + STATUS_INTERVAL * 3;
        while stream.acked_on_server() < st.acked && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if stream.acked_on_server() < st.acked {
            warn!(source = %self.config.name, acked = %lsn_text(st.acked), on_server = %lsn_text(stream.acked_on_server()), "the last slot position did not reach the server; what came after it is sent again");
        } else {
            debug!(source = %self.config.name, position = %lsn_text(st.acked), "slot position reached the server");
        }
    }
}

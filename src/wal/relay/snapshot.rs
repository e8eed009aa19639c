//! Before streaming: the rows the table already holds go first, in id
//! order, and the stream skips what that read already sent.

use super::*;

/// A transaction snapshot (`txid_current_snapshot()`), on 32-bit xids as
/// the stream's Begin carries them: which transactions had committed when
/// it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct XidSnapshot {
    xmin: u32,
    xmax: u32,
    running: Vec<u32>,
}

impl XidSnapshot {
    /// `xmin:xmax:xip,xip` (64-bit, epoch included).
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().splitn(3, ':');
        let low = |v: &str| v.trim().parse::<u64>().ok().map(|x| x as u32);
        let xmin = low(parts.next()?)?;
        let xmax = low(parts.next()?)?;
        let running = match parts.next() {
            Some(list) if !list.trim().is_empty() => {
                list.split(',').map(low).collect::<Option<Vec<u32>>>()?
            }
            _ => Vec::new(),
        };
        Some(Self {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether `xid` had ended when the snapshot was taken (as the stream
    /// only brings committed ones: committed). Comparisons wrap, as
    /// PostgreSQL's do.
    pub(super) fn saw(&self, xid: u32) -> bool {
        let precedes = |a: u32, b: u32| (a.wrapping_sub(b) as i32) < 0;
        if precedes(xid, self.xmin) {
            return true;
        }
        if !precedes(xid, self.xmax) {
            return false;
        }
        !self.running.contains(&xid)
    }
}

impl<P: Publisher> WalRelay<P> {
    /// Reads the rows the table holds, in id order, and sends them before
    /// anything from the stream. `Some` if the session ended meanwhile.
    pub(super) async fn snapshot<S: WalStream>(
        &self,
        st: &mut State,
        stream: &S,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Option<End>, SessionError> {
        let batch = i64::try_from(self.config.batch_size).unwrap_or(i64::MAX);
        let mut after = 0i64;
        let mut total = 0usize;
        // Taken before the first page: whatever it counts as committed,
        // every page sees.
        let client = step("take a connection", self.pool.get()).await?;
        let seen: String = step(
            "read the transaction snapshot",
            client.query_one("SELECT txid_current_snapshot()::text", &[]),
        )
        .await?
        .try_get(0)
        .unwrap_or_default();
        drop(client);
        st.read_before = XidSnapshot::parse(&seen);
        loop {
            let client = step("take a connection", self.pool.get()).await?;
            let rows = step(
                "read the outbox table",
                client.query(&self.sql.snapshot, &[&after, &batch]),
            )
            .await?;
            let short = (rows.len() as i64) < batch;
            for r in &rows {
                let row = crate::source::claim::decode(r).map_err(|e| DbError::Failed {
                    step: "read the outbox table",
                    source: Box::new(e),
                })?;
                after = after.max(row.id);
                st.skip.insert(row.id);
                st.pending.push_back(Item::new(row, None, true));
            }
            total += rows.len();
            if short {
                // Every row read above committed before this position: the
                // stream's copies of them all come before it.
                let lsn = step(
                    "read the log position",
                    client.query_one(
                        "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
                        &[],
                    ),
                )
                .await?;
                st.snapshot_lsn = lsn
                    .try_get::<_, i64>(0)
                    .map(|v| v as u64)
                    .unwrap_or(u64::MAX);
            }
            drop(client);
            while !st.pending.is_empty() {
                if self.health.paused() {
                    return Ok(Some(End::Paused));
                }
                if let Some(end) = self.send_next(st, stream, drain, abort).await? {
                    return Ok(Some(end));
                }
            }
            if short {
                if total > 0 {
                    info!(source = %self.config.name, rows = total, "sent the rows the table held before streaming");
                }
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::XidSnapshot;

    #[test]
    pub(super) fn a_transaction_snapshot_says_what_had_committed() {
        let s = XidSnapshot::parse("100:110:103,105").unwrap();
        assert!(s.saw(99) && s.saw(100) && s.saw(104) && s.saw(109));
        assert!(!s.saw(103) && !s.saw(105), "running when it was taken");
        assert!(!s.saw(110) && !s.saw(111), "not begun");
        let empty = XidSnapshot::parse("7:7:").unwrap();
        assert!(empty.saw(6) && !empty.saw(7));
        // 64-bit with an epoch: the low 32 bits, compared with wraparound.
        let e = (1u64 << 32) + u64::from(u32::MAX - 1);
        let s = XidSnapshot::parse(&format!("{e}:{}:", e + 4)).unwrap();
        assert!(s.saw(u32::MAX - 2), "before xmin");
        assert!(
            s.saw(u32::MAX) && s.saw(0) && s.saw(1),
            "between, across the wrap"
        );
        assert!(!s.saw(2) && !s.saw(3), "at or after xmax");
        assert_eq!(XidSnapshot::parse("nonsense"), None);
        assert_eq!(XidSnapshot::parse("1:x:"), None);
    }
}

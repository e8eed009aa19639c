//! Which position the slot may move to: a FIFO of transactions, each with
//! the end of its commit record and how many of its messages are not yet
//! done (delivered with a plain ack, or parked). The slot moves only past
//! a prefix of transactions that are all done, so a restart resends
//! everything after the first one that is not, and nothing before it is
//! ever skipped. Pure: no database, no broker.

use std::collections::VecDeque;

#[derive(Debug)]
struct Entry {
    seq: u64,
    /// `None` until its Commit came.
    end_lsn: Option<u64>,
    outstanding: usize,
}

#[derive(Debug, Default)]
pub struct Ledger {
    entries: VecDeque<Entry>,
    next: u64,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A transaction begins; returns its number.
    pub fn begin(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.entries.push_back(Entry {
            seq,
            end_lsn: None,
            outstanding: 0,
        });
        seq
    }

    /// One more message of transaction `seq` to wait for.
    pub fn add(&mut self, seq: u64) {
        if let Some(e) = self.entry(seq) {
            e.outstanding += 1;
        }
    }

    /// Transaction `seq` committed; its commit record ends at `end_lsn`.
    pub fn commit(&mut self, seq: u64, end_lsn: u64) {
        if let Some(e) = self.entry(seq) {
            e.end_lsn = Some(end_lsn);
        }
    }

    /// One message of transaction `seq` is done.
    pub fn done(&mut self, seq: u64) {
        if let Some(e) = self.entry(seq) {
            e.outstanding = e.outstanding.saturating_sub(1);
        }
    }

    /// Drops the finished transactions at the front; returns the position
    /// the slot may move to, if it moved.
    pub fn advance(&mut self) -> Option<u64> {
        let mut to = None;
        while let Some(front) = self.entries.front() {
            match front.end_lsn {
                Some(end) if front.outstanding == 0 => {
                    to = Some(end);
                    self.entries.pop_front();
                }
                _ => break,
            }
        }
        to
    }

    /// Nothing is open or waiting: a keepalive's position may be acknowledged.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Messages not yet done, over every transaction.
    pub fn outstanding(&self) -> usize {
        self.entries.iter().map(|e| e.outstanding).sum()
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Entry> {
        // Entries are in seq order; the one asked for is near the front.
        let first = self.entries.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.entries.get_mut(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_only_past_a_prefix_of_finished_transactions() {
        let mut l = Ledger::new();
        let a = l.begin();
        l.add(a);
        l.add(a);
        l.commit(a, 100);
        let b = l.begin();
        l.add(b);
        l.commit(b, 200);
        // b is done before a: nothing moves
        l.done(b);
        assert_eq!(l.advance(), None);
        l.done(a);
        assert_eq!(l.advance(), None, "a has one left");
        l.done(a);
        assert_eq!(l.advance(), Some(200), "a and b both done");
        assert!(l.is_empty());
    }

    #[test]
    fn an_open_transaction_holds_the_position_even_when_its_messages_are_done() {
        let mut l = Ledger::new();
        let a = l.begin();
        l.add(a);
        l.done(a);
        assert_eq!(l.advance(), None, "no Commit yet: more may come");
        l.commit(a, 50);
        assert_eq!(l.advance(), Some(50));
    }

    #[test]
    fn an_empty_transaction_moves_at_its_commit() {
        let mut l = Ledger::new();
        let a = l.begin();
        l.commit(a, 10);
        assert!(!l.is_empty());
        assert_eq!(l.advance(), Some(10));
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn unknown_numbers_are_ignored() {
        let mut l = Ledger::new();
        l.add(5);
        l.done(5);
        l.commit(5, 1);
        assert_eq!(l.advance(), None);
        let a = l.begin();
        l.commit(a, 9);
        assert_eq!(l.advance(), Some(9));
        // a is gone: a late done for it changes nothing
        l.done(a);
        assert_eq!(l.advance(), None);
    }
}

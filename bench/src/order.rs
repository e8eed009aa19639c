//! Reading a queue back after a run: the `seq` every payload carries (the
//! fill and the producers put one in each), in the order the queue hands
//! them out, and what that says about order, duplicates and losses.

use std::collections::HashSet;
use std::future::poll_fn;
use std::time::Duration;

use futures_core::Stream;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;

use crate::env::{Env, QueueType};
use crate::report::Report;

/// How long to wait for the next message before calling the queue short.
const QUIET: Duration = Duration::from_secs(10);

/// The `seq` of a payload, if it has one.
pub fn seq_of(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["seq"].as_i64())
}

/// Every message now in `queue`, consumed (auto-ack), as their seqs in
/// delivery order.
pub async fn read_back(env: &Env, kind: QueueType, queue: &str) -> Result<Vec<i64>, String> {
    let n = env.message_count(kind, queue).await? as usize;
    let ch = env.amqp.create_channel().await.map_err(|e| e.to_string())?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consumer = ch
        .basic_consume(queue.into(), "".into(), no_ack, FieldTable::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = Box::pin(consumer);
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        let next = tokio::time::timeout(QUIET, poll_fn(|cx| consumer.as_mut().poll_next(cx)));
        let delivery = match next.await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => return Err(format!("reading {queue} back: {e}")),
            Ok(None) => return Err(format!("reading {queue} back: the consumer was closed")),
            Err(_) => {
                return Err(format!(
                    "reading {queue} back: {} of {n} messages, then none for {QUIET:?}",
                    seqs.len()
                ));
            }
        };
        seqs.push(seq_of(&delivery.data).ok_or("a message without a seq in its payload")?);
    }
    let _ = ch.close(200, "OK".into()).await;
    Ok(seqs)
}

/// What a queue's seqs say, in delivery order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Seqs seen once at least.
    pub distinct: usize,
    /// Messages whose seq was seen before: the same row published again,
    /// which at-least-once allows and consumers drop.
    pub duplicates: usize,
    /// With the duplicates dropped, seqs lower than one delivered earlier.
    pub breaks: usize,
}

impl Tally {
    pub fn of(seqs: &[i64]) -> Self {
        let mut seen = HashSet::with_capacity(seqs.len());
        let mut top = i64::MIN;
        let mut breaks = 0;
        for &s in seqs {
            if !seen.insert(s) {
                continue;
            }
            if s < top {
                breaks += 1;
            }
            top = top.max(s);
        }
        Tally {
            distinct: seen.len(),
            duplicates: seqs.len() - seen.len(),
            breaks,
        }
    }
}

/// Reports the order breaks and duplicates of each repeat of `what`;
/// returns the worst (breaks, duplicates).
pub fn report(report: &mut Report, what: &str, tallies: &[Tally]) -> (usize, usize) {
    let col = |f: fn(&Tally) -> usize| tallies.iter().map(f).collect::<Vec<usize>>();
    let (breaks, duplicates) = (col(|t| t.breaks), col(|t| t.duplicates));
    let worst = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let worst = (worst(&breaks), worst(&duplicates));
    let floats = |v: Vec<usize>| v.into_iter().map(|n| n as f64).collect();
    report.add(
        format!("{what}: order breaks"),
        "msgs",
        floats(breaks),
        "seq below an earlier one, duplicates dropped; must be 0",
    );
    report.add(
        format!("{what}: duplicates"),
        "msgs",
        floats(duplicates),
        "seq seen before: a row published again (at-least-once)",
    );
    worst
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tally_drops_duplicates_before_judging_order() {
        let t = |s: &[i64]| {
            let t = Tally::of(s);
            (t.distinct, t.duplicates, t.breaks)
        };
        // in order
        assert_eq!(t(&[1, 2, 3]), (3, 0, 0));
        // a batch published again after a lost confirm: duplicates, no break
        assert_eq!(t(&[1, 2, 3, 2, 3, 4]), (4, 2, 0));
        // one row overtaken: one break
        assert_eq!(t(&[1, 3, 2, 4]), (4, 0, 1));
        // nothing read
        assert_eq!(t(&[]), (0, 0, 0));
    }
}

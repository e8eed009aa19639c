//! Per-aggregate ordering with several relays on one table: order under
//! load, failover after kill -9, a hot aggregate beside quiet ones. They
//! start several relays and producers each, so they run on their own, one
//! at a time: `cargo test --test ordering -- --test-threads=1`.

#[path = "../integration/support/mod.rs"]
mod support;

mod failover;
mod frozen;
mod hot;
mod order;
mod rolling;

use std::time::{Duration, Instant};

pub use support::aggregates::{Event, aggregates, check_order, produce};
use support::broker::TestBroker;
use support::db::TestDb;
use support::relay::Relay;

/// Receives until `distinct` different events have arrived, and then
/// (with `linger`) until no message comes for a second, so late duplicates
/// are counted too; fails after `timeout`. Calls `during` with the events
/// so far after each message.
pub async fn receive(
    broker: &mut TestBroker,
    distinct: usize,
    linger: bool,
    timeout: Duration,
    mut during: impl FnMut(&[Event]),
) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::with_capacity(distinct * 2);
    let mut seen = std::collections::HashSet::new();
    loop {
        let wait = if seen.len() >= distinct {
            if !linger {
                break;
            }
            Duration::from_secs(1)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let Some(m) = broker.next(wait).await else {
            break;
        };
        let event = Event::from_payload(&m.json());
        seen.insert((event.aggregate.clone(), event.seq));
        events.push(event);
        during(&events);
    }
    assert!(
        seen.len() >= distinct,
        "only {} of {distinct} events arrived within {timeout:?}",
        seen.len()
    );
    events
}

/// Each relay's `/status`: (pid, partitions owned, relays it counts).
pub async fn ownership(relays: &[&Relay]) -> Vec<(u64, Vec<i64>, i64)> {
    let mut out = Vec::new();
    for r in relays {
        let Some((_, body)) = support::http::get(r.admin, "/status").await else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        let s = &v["sources"][0];
        out.push((
            v["pid"].as_u64().unwrap_or(0),
            s["partitions"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_i64()).collect())
                .unwrap_or_default(),
            s["relays"].as_i64().unwrap_or(0),
        ));
    }
    out
}

/// Waits until the relays own every partition between them, none more
/// than its fair share ceil(64 / relays) (so none less than what the others
/// leave), and each counts them all.
pub async fn balanced(relays: &[&Relay], timeout: Duration) -> Vec<usize> {
    let n = relays.len();
    support::eventually("the partitions to be balanced", timeout, || async move {
        let own = ownership(relays).await;
        let counts: Vec<usize> = own.iter().map(|(_, p, _)| p.len()).collect();
        let mut all: Vec<i64> = own.iter().flat_map(|(_, p, _)| p.clone()).collect();
        all.sort_unstable();
        all.dedup();
        let share = 64usize.div_ceil(n);
        let ok = own.len() == n
            && all.len() == 64
            && counts.iter().sum::<usize>() == 64
            && counts
                .iter()
                .all(|c| *c <= share && *c + (n - 1) * share >= 64)
            && own.iter().all(|(_, _, r)| *r == n as i64);
        ok.then_some(counts)
    })
    .await
}

/// A relay config with ordering by aggregate (the default) and the poll
/// interval (which is also the rebalance interval) given.
pub fn ordered_config(db: &TestDb, exchange: &str, poll: &str) -> String {
    support::relay::config(
        support::AMQP_URL,
        &[support::relay::SourceSpec::new("orders", &db.url, exchange)
            .set("poll_interval", &format!("{poll:?}"))],
    )
}

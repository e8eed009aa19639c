//! What becomes of each row once the broker has answered: the one place
//! that chooses between delivered, retry and park, and which aggregates
//! may go on. Pure: no database, no broker.

use std::collections::{HashMap, HashSet};

use crate::backoff::Backoff;
use crate::config::{OnPark, SourceConfig};
use crate::message::{Outbound, OutboxRow};
use crate::sink::{Failure, FailureReason, Outcome};
use crate::source::Plan;

/// What happens to a row that was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Retry,
    Park,
}

/// Retry or park a row that failed for `reason` on attempt number `attempt`
/// (1 for the first try).
pub fn decide(reason: FailureReason, attempt: u32, max_attempts: u32) -> Disposition {
    match reason {
        // The row's content is the problem; trying again cannot help.
        FailureReason::BadRow => Disposition::Park,
        // The broker refuses this row (no route, no exchange, a refusal
        // that closed the channel over it): likely to need an operator
        // after enough tries.
        FailureReason::Returned | FailureReason::ExchangeNotFound | FailureReason::Refused => {
            if attempt >= max_attempts {
                Disposition::Park
            } else {
                Disposition::Retry
            }
        }
        // The broker or the link failed, not the row: never park for it,
        // however long an outage lasts. A nack is one of these: RabbitMQ
        // nacks for a queue's state (full with overflow = reject-publish,
        // a quorum queue between leaders, an internal error), never for a
        // message's content, and during a cluster failover it nacked every
        // publish of a connection for three minutes (session 10's failover
        // runs): parking then buried thousands of healthy rows in the
        // dead-letter table for an operator to replay.
        FailureReason::Nacked | FailureReason::Timeout | FailureReason::Connection => {
            Disposition::Retry
        }
    }
}

/// The attempt a failure of `row` is (1 for its first try).
pub fn attempt_of(row: &OutboxRow) -> u32 {
    u32::try_from(row.attempts).unwrap_or(0).saturating_add(1)
}

fn delay_ms(retry: &Backoff, attempt: u32) -> i64 {
    i64::try_from(retry.jittered(attempt).as_millis()).unwrap_or(i64::MAX)
}

/// The settlement of a batch: `outcomes[i]` is the broker's answer for
/// `rows[i]`. Without a dead-letter table (`can_park` false) failing rows
/// are retried, never parked.
///
/// Ordered, `rows` are in id order, and an aggregate stops at its first
/// row that is retried (or parked with `on_park = "hold"`): its later rows
/// in the batch are held, whatever the broker answered for them, and go
/// again, in order, once that row is delivered. A later row the broker
/// took is an order break (a consumer saw it first): listed, so it is
/// counted and logged.
pub fn plan(cfg: &SourceConfig, rows: &[OutboxRow], outcomes: &[Outcome], can_park: bool) -> Plan {
    let mut plan = Plan::default();
    let ordered = cfg.ordering.ordered();
    let go_on = cfg.on_park == OnPark::Continue;
    // Aggregate -> the row it stopped at.
    let mut stopped: HashMap<(&str, &str), i64> = HashMap::new();
    // Aggregates that went through (a row delivered, or parked with
    // on_park = "continue"), in first-seen order.
    let mut went: Vec<(&str, &str)> = Vec::new();
    let mut seen = HashSet::new();
    for (row, outcome) in rows.iter().zip(outcomes) {
        let attempt = attempt_of(row);
        plan.fallback_delay_ms
            .push((row.id, delay_ms(&cfg.retry, attempt)));
        let aggregate = row.aggregate();
        if let Some(&at) = stopped.get(&aggregate) {
            plan.hold.push(row.id);
            if matches!(outcome, Outcome::Delivered) {
                plan.order_breaks.push((at, row.id));
            }
            continue;
        }
        let goes_on = match outcome {
            Outcome::Delivered => {
                plan.delivered.push(row.id);
                true
            }
            Outcome::Failed(f) => {
                let disposition = if can_park {
                    decide(f.reason, attempt, cfg.max_attempts)
                } else {
                    Disposition::Retry
                };
                let stops = match disposition {
                    Disposition::Retry => {
                        plan.retry(row.id, &f.to_string(), delay_ms(&cfg.retry, attempt));
                        true
                    }
                    Disposition::Park => {
                        plan.park(row.id, &f.to_string(), f.reason.as_str());
                        !go_on
                    }
                };
                if ordered && stops {
                    stopped.insert(aggregate, row.id);
                }
                !stops
            }
        };
        if goes_on && seen.insert(aggregate) {
            went.push(aggregate);
        }
    }
    // Ordered: the aggregates whose held rows may go now, those that went
    // through and did not stop later in this batch.
    let (types, ids): (Vec<String>, Vec<String>) = went
        .into_iter()
        .filter(|a| ordered && !stopped.contains_key(a))
        .map(|(t, a)| (t.to_owned(), a.to_owned()))
        .unzip();
    plan.release = (!types.is_empty()).then_some((types, ids));
    plan
}

/// Ordered with `on_park = "hold"`: a bad row (known before anything is
/// sent) stops its aggregate as [`plan`] would, so its later rows in the
/// batch are not sent at all (the plan holds them) rather than sent ahead
/// of it.
pub fn behind_bad_rows(rows: &[OutboxRow], messages: &mut [Result<Outbound, Failure>]) {
    let mut stopped: HashMap<(&str, &str), i64> = HashMap::new();
    for (row, message) in rows.iter().zip(messages.iter_mut()) {
        if let Some(bad) = stopped.get(&row.aggregate()) {
            *message = Err(Failure::new(
                FailureReason::BadRow,
                format!("not sent: waits behind bad row {bad} of its aggregate"),
            ));
        } else if message.is_err() {
            stopped.insert(row.aggregate(), row.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::sink::Failure;
    use FailureReason::*;

    #[test]
    fn decides_retry_or_park_in_one_place() {
        let cases = [
            // a bad row is parked on its first attempt
            (BadRow, 1, 10, Disposition::Park),
            // refused by the broker: retried until the last attempt...
            (Returned, 1, 10, Disposition::Retry),
            (ExchangeNotFound, 9, 10, Disposition::Retry),
            (Refused, 9, 10, Disposition::Retry),
            // ...and parked on it
            (ExchangeNotFound, 10, 10, Disposition::Park),
            (Returned, 11, 10, Disposition::Park),
            (Refused, 10, 10, Disposition::Park),
            // max_attempts = 1 parks at the first refusal
            (Returned, 1, 1, Disposition::Park),
            // outages (and nacks, the broker's trouble too) never park,
            // however many attempts
            (Nacked, 1000, 10, Disposition::Retry),
            (Nacked, 1, 1, Disposition::Retry),
            (Timeout, 1000, 10, Disposition::Retry),
            (Connection, 1000, 10, Disposition::Retry),
        ];
        for (reason, attempt, max, want) in cases {
            assert_eq!(
                decide(reason, attempt, max),
                want,
                "{reason} attempt {attempt}/{max}"
            );
        }
    }

    fn config(extra: &str) -> SourceConfig {
        let text = format!(
            "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"s\"\n\
             database_url = \"postgres://u@h/db\"\nmax_attempts = 3\n{extra}"
        );
        let mut config = Config::from_toml(&text, &|_| None).expect("test config");
        config.sources.remove(0)
    }

    fn row(id: i64, aggregate: &str, attempts: i32) -> OutboxRow {
        OutboxRow {
            id,
            aggregate_type: "order".into(),
            aggregate_id: aggregate.into(),
            event_type: "E".into(),
            payload: "{}".into(),
            headers: String::new(),
            dedup_key: format!("k{id}"),
            exchange: None,
            routing_key: None,
            created_at: std::time::UNIX_EPOCH,
            attempts,
            undecodable: None,
        }
    }

    fn failed(reason: FailureReason) -> Outcome {
        Outcome::Failed(Failure::new(reason, "x"))
    }

    #[test]
    fn a_plan_sends_each_row_where_its_outcome_says() {
        let cfg = config("");
        let rows = [
            row(1, "a", 0),
            row(2, "b", 0),
            row(3, "c", 2),
            row(4, "d", 0),
        ];
        let outcomes = [
            Outcome::Delivered,
            failed(Nacked),
            // the third refusal of row 3: max_attempts reached
            failed(Returned),
            failed(BadRow),
        ];
        let plan = plan(&cfg, &rows, &outcomes, true);
        assert_eq!(plan.delivered, [1]);
        assert_eq!(plan.retry.iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
        let parked: Vec<(i64, &str)> = plan.park.iter().map(|p| (p.0, p.2)).collect();
        assert_eq!(parked, [(3, "returned"), (4, "bad_row")]);
        assert!(plan.park[0].1.starts_with("returned"), "{}", plan.park[0].1);
        // Every row has a delay ready, should its settlement be refused.
        assert_eq!(plan.fallback_delay_ms.len(), 4);
    }

    #[test]
    fn without_a_dead_letter_table_nothing_is_parked() {
        let cfg = config("");
        let plan = plan(&cfg, &[row(4, "d", 0)], &[failed(BadRow)], false);
        assert!(plan.park.is_empty());
        assert_eq!(plan.retry.len(), 1);
    }

    #[test]
    fn a_held_aggregate_goes_on_after_a_park_only_with_on_park_continue() {
        let rows = [row(1, "a", 0), row(2, "b", 0)];
        let outcomes = [Outcome::Delivered, failed(BadRow)];
        // hold (the default): only the delivered aggregate's next row goes.
        let hold = plan(&config(""), &rows, &outcomes, true);
        assert_eq!(hold.release, Some((vec!["order".into()], vec!["a".into()])));
        // continue: the parked one's aggregate goes on too.
        let go_on = plan(&config("on_park = \"continue\""), &rows, &outcomes, true);
        assert_eq!(
            go_on.release,
            Some((
                vec!["order".into(), "order".into()],
                vec!["a".into(), "b".into()]
            ))
        );
        // Without ordering nothing is held, so nothing is released.
        let none = plan(&config("ordering = \"none\""), &rows, &outcomes, true);
        assert_eq!(none.release, None);
    }

    fn agg(id: i64, aggregate: &str) -> OutboxRow {
        row(id, aggregate, 0)
    }

    #[test]
    fn an_aggregate_stops_at_its_first_failed_row_and_what_follows_is_held() {
        let cfg = config("");
        // a: 1 delivered, 2 nacked (retry), 3 taken by the broker, 4 nacked.
        // b: 5 delivered, after a's failure: b is not held back.
        let rows = [
            agg(1, "a"),
            agg(2, "a"),
            agg(3, "a"),
            agg(4, "a"),
            agg(5, "b"),
        ];
        let outcomes = [
            Outcome::Delivered,
            failed(Nacked),
            Outcome::Delivered,
            failed(Nacked),
            Outcome::Delivered,
        ];
        let plan = plan(&cfg, &rows, &outcomes, true);
        assert_eq!(plan.delivered, [1, 5]);
        assert_eq!(plan.retry.iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
        assert_eq!(plan.hold, [3, 4]);
        // 3 was taken while 2 was refused: one break, named by both rows.
        assert_eq!(plan.order_breaks, [(2, 3)]);
        // a stopped: its held rows wait for 2; b's may go.
        assert_eq!(plan.release, Some((vec!["order".into()], vec!["b".into()])));
    }

    #[test]
    fn a_park_stops_the_aggregate_only_with_on_park_hold() {
        let rows = [agg(1, "a"), agg(2, "a")];
        let outcomes = [failed(BadRow), Outcome::Delivered];
        let hold = plan(&config(""), &rows, &outcomes, true);
        assert_eq!(hold.park.len(), 1);
        assert_eq!(hold.hold, [2]);
        assert!(hold.delivered.is_empty());
        let go_on = plan(&config("on_park = \"continue\""), &rows, &outcomes, true);
        assert!(go_on.hold.is_empty());
        assert_eq!(go_on.delivered, [2]);
        assert!(go_on.order_breaks.is_empty());
    }

    #[test]
    fn without_ordering_nothing_is_held() {
        let rows = [agg(1, "a"), agg(2, "a")];
        let outcomes = [failed(Nacked), Outcome::Delivered];
        let plan = plan(&config("ordering = \"none\""), &rows, &outcomes, true);
        assert!(plan.hold.is_empty());
        assert!(plan.order_breaks.is_empty());
        assert_eq!(plan.delivered, [2]);
    }
}

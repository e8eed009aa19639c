//! The goals of issue 10, as ratios against the classic ceiling measured in
//! the same run: whatever a goal needs and the other parts have not
//! measured yet is measured here, then one table line per goal row of the
//! issue: measured, goal, met.

use serde_json::json;

use crate::drain::{Drains, Spec};
use crate::env::{Env, QueueType};
use crate::latency::{self, GOAL_LOADS};
use crate::report::Report;
use crate::{Options, recovery, scaleout};

/// What the parts measured so far, for the goals to reuse.
#[derive(Default)]
pub struct Measured {
    pub drains: Drains,
    pub scaleout: scaleout::Runs,
    pub latency: Vec<latency::Measured>,
    /// The broker alone, publish→consumer, by rate.
    pub floors: Vec<latency::Floor>,
    pub recovery: Option<recovery::Outcome>,
}

pub struct Goal {
    load: String,
    measured: String,
    goal: &'static str,
    met: bool,
}

pub async fn run(
    env: &Env,
    o: &Options,
    ceiling: f64,
    m: &mut Measured,
    report: &mut Report,
) -> Result<Vec<Goal>, String> {
    let mut goals = Vec::new();
    let rows = o.rows;
    let drains = [
        (
            format!("1,000 aggregates, {rows} rows"),
            Spec::classic("aggregate", 1000, rows),
            0.90,
            "≥ 0.90 of ceiling",
        ),
        (
            format!("100 aggregates, {rows} rows"),
            Spec::classic("aggregate", 100, rows),
            0.85,
            "≥ 0.85",
        ),
        (
            format!("1 aggregate, {} rows, in order", rows / 2),
            Spec::classic("aggregate", 1, rows / 2),
            0.50,
            "≥ 0.50",
        ),
        (
            "ordering = \"none\"".to_owned(),
            Spec::classic("none", 1000, rows),
            0.95,
            "≥ 0.95",
        ),
    ];
    for (load, spec, floor, goal) in drains {
        let d = m.drains.measure(env, spec, o, ceiling, report).await?;
        let ratio = d.rate / ceiling;
        // The CPU the relay and PostgreSQL used in this drain, taken from
        // the broker's machine: the ceiling beside that much busy work.
        let cores = (d.relay_us + d.pg_us) * d.rate / 1e6;
        let beside = crate::ceiling::beside(
            env,
            QueueType::Classic,
            o,
            cores,
            &format!("the CPU of the drain {load}"),
            report,
        )
        .await?;
        let mut measured = format!(
            "{ratio:.2} ({:.0} msg/s; {:.2} of the ceiling beside the {cores:.2} cores the relay and PostgreSQL used, {beside:.0} msg/s)",
            d.rate,
            d.rate / beside
        );
        let mut met = ratio >= floor;
        if let Some((breaks, duplicates)) = d.order {
            measured.push_str(&format!(", {breaks} order breaks, {duplicates} duplicates"));
            met &= breaks == 0 && duplicates == 0;
        }
        goals.push(Goal {
            load,
            measured,
            goal,
            met,
        });
    }

    // `--only goal-drains`: the four drains alone, for paired runs of two
    // configs (a goals run takes 5 minutes, its drains 2).
    if !o.wants("goals") {
        return Ok(goals);
    }
    let ratio = m
        .scaleout
        .ratio(env, "aggregate", o, ceiling, report)
        .await?;
    let three = m
        .scaleout
        .measure(env, "aggregate", 3, o, ceiling, report)
        .await?;
    goals.push(Goal {
        load: "3 relays vs 1".into(),
        measured: format!(
            "{ratio:.2} of the 1-relay rate, each relay {:.0}–{:.0}%",
            three.share_lo * 100.0,
            three.share_hi * 100.0
        ),
        goal: "≥ 0.9 of the 1-relay rate, each relay 25–40%",
        met: ratio >= 0.9 && three.share_lo >= 0.25 && three.share_hi <= 0.40,
    });

    if !GOAL_LOADS
        .iter()
        .all(|l| m.latency.iter().any(|x| x.load == *l))
    {
        // With the broker alone at the same rates: what the machine's
        // broker gives a message from publish to consumer, no database.
        let rates: Vec<u32> = GOAL_LOADS.iter().map(|l| l.rate).collect();
        let (lat, floors) = latency::run(env, o, report, &GOAL_LOADS, &rates).await?;
        m.latency.extend(lat);
        m.floors.extend(floors);
    }
    let lat: Vec<&latency::Measured> = GOAL_LOADS
        .iter()
        .filter_map(|l| m.latency.iter().find(|x| x.load == *l))
        .collect();
    goals.push(Goal {
        load: "commit→consumer, 100 rows/s one aggregate, and 1,000 rows/s over 100 aggregates"
            .into(),
        measured: lat
            .iter()
            .map(|x| {
                let floor = m
                    .floors
                    .iter()
                    .find(|f| f.rate == x.load.rate)
                    .map(|f| {
                        format!(
                            " (the broker alone, publish→consumer: p50 {:.2}, p99 {:.2})",
                            f.p50, f.p99
                        )
                    })
                    .unwrap_or_default();
                format!("p50 {:.2} ms, p99 {:.2} ms{floor}", x.p50, x.p99)
            })
            .collect::<Vec<_>>()
            .join("; "),
        goal: "p50 ≤ 2 ms, p99 ≤ 5 ms",
        met: lat.len() == GOAL_LOADS.len() && lat.iter().all(|x| x.p50 <= 2.0 && x.p99 <= 5.0),
    });

    let ratio = m
        .drains
        .pg_ratio(env, QueueType::Classic, o, ceiling, report)
        .await?;
    goals.push(Goal {
        load: "PostgreSQL CPU per message, aggregate vs none".into(),
        measured: format!("{ratio:.2}×"),
        goal: "≤ 1.2×",
        met: ratio <= 1.2,
    });

    let r = match m.recovery {
        Some(r) => r,
        None => *m.recovery.insert(recovery::run(env, o, report).await?),
    };
    goals.push(Goal {
        load: "2,000 rows/s one aggregate with a 5 s broker stop".into(),
        measured: format!(
            "backlog gone {:.1} s after the broker returned, {} rows lost, {} left",
            r.backlog_gone_s, r.lost, r.left
        ),
        goal: "backlog gone within 30 s of the broker's return",
        met: r.backlog_gone_s <= 30.0 && r.lost == 0 && r.left == 0,
    });
    for g in &goals {
        println!(
            "{}",
            json!({"goal": g.load, "measured": g.measured, "target": g.goal, "met": g.met})
        );
    }
    Ok(goals)
}

pub fn print_table(goals: &[Goal]) {
    println!();
    println!("| load | measured | goal | met |");
    println!("|---|---|---|---|");
    for g in goals {
        let met = if g.met { "met" } else { "unmet" };
        println!("| {} | {} | {} | {met} |", g.load, g.measured, g.goal);
    }
}

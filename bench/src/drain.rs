//! Drain: pre-fill the outbox, start outboxd, time until the table is empty
//! (or, in mark mode, fully marked) and the queue holds every message. A
//! drain of one aggregate then reads the queue back to check the order.
//!
//! Each drain is measured once per run (`Drains` keeps the outcomes), so
//! the goals reuse the matrix's figures instead of draining again.

use std::collections::HashMap;

use crate::Options;
use crate::env::{CpuMark, Env, QueueType, pg, relay_config};
use crate::order::{Tally, read_back};
use crate::report::{Report, median};

/// Aggregates of the matrix's drains (and of the scale-out runs).
pub const AGGREGATES: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Spec {
    pub queue: QueueType,
    /// `after_publish`: "delete" or "mark"
    pub mode: &'static str,
    /// "aggregate", "aggregate_strict" or "none"
    pub ordering: &'static str,
    pub aggregates: usize,
    pub rows: usize,
}

impl Spec {
    /// Delete mode on a classic queue: the drains of the goals.
    pub fn classic(ordering: &'static str, aggregates: usize, rows: usize) -> Self {
        Spec {
            queue: QueueType::Classic,
            mode: "delete",
            ordering,
            aggregates,
            rows,
        }
    }

    /// One aggregate: every row has a predecessor, so the order shows.
    fn checks_order(&self) -> bool {
        self.aggregates == 1
    }

    /// The matrix's drains keep their names of earlier runs.
    fn name(&self) -> String {
        let base = format!(
            "{} {} ordering={}",
            self.queue.name(),
            self.mode,
            self.ordering
        );
        if self.aggregates == AGGREGATES {
            base
        } else {
            format!(
                "{base}, {} aggregate(s), {} rows",
                self.aggregates, self.rows
            )
        }
    }
}

/// Medians over the repeats; for the order check, the worst repeat.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub rate: f64,
    /// PostgreSQL CPU per message, µs.
    pub pg_us: f64,
    /// The relay's CPU per message, µs.
    pub relay_us: f64,
    /// (order breaks, duplicates), when the drain checks the order.
    pub order: Option<(usize, usize)>,
}

#[derive(Default)]
pub struct Drains {
    done: HashMap<Spec, Outcome>,
    pg_ratios: HashMap<QueueType, f64>,
}

/// The drains whose PostgreSQL CPU the goals compare: `ordering =
/// "aggregate"` and `"none"`, delete mode, 1,000 aggregates.
fn pg_pair(queue: QueueType, rows: usize) -> (Spec, Spec) {
    let aggregate = Spec {
        queue,
        mode: "delete",
        ordering: "aggregate",
        aggregates: AGGREGATES,
        rows,
    };
    (
        aggregate,
        Spec {
            ordering: "none",
            ..aggregate
        },
    )
}

impl Drains {
    /// The outcome of `spec`, draining (and reporting) it the first time.
    /// Either drain of the PostgreSQL ratio (`pg_pair`) is drained with
    /// the other, in pairs (`pair`), whichever a caller asks for first.
    pub async fn measure(
        &mut self,
        env: &Env,
        spec: Spec,
        o: &Options,
        ceiling: f64,
        report: &mut Report,
    ) -> Result<Outcome, String> {
        if let Some(d) = self.done.get(&spec) {
            return Ok(*d);
        }
        let (a, b) = pg_pair(spec.queue, o.rows);
        if spec == a || spec == b {
            self.pair(env, a, b, o, ceiling, report).await?;
            return Ok(self.done[&spec]);
        }
        let d = measure(env, spec, o, ceiling, report).await?;
        self.done.insert(spec, d);
        Ok(d)
    }

    /// PostgreSQL CPU per message with `ordering = "aggregate"` over
    /// `"none"` (delete mode, 1,000 aggregates), reported once per queue
    /// type (by `pair`).
    pub async fn pg_ratio(
        &mut self,
        env: &Env,
        queue: QueueType,
        o: &Options,
        ceiling: f64,
        report: &mut Report,
    ) -> Result<f64, String> {
        let (a, _) = pg_pair(queue, o.rows);
        self.measure(env, a, o, ceiling, report).await?;
        Ok(self.pg_ratios[&queue])
    }

    /// Drains `aggregate` and `none` one of each back to back in every
    /// repeat, reports both, and the ratio of their PostgreSQL CPU per
    /// message: the median of the pairs' ratios, so that the machine's
    /// speed, which drifts over the minutes between the first drain of a
    /// run and the last (the same ceiling probe read 13.7–15.7k msg/s
    /// within one run), reaches both drains of a pair alike.
    async fn pair(
        &mut self,
        env: &Env,
        aggregate: Spec,
        none: Spec,
        o: &Options,
        ceiling: f64,
        report: &mut Report,
    ) -> Result<(), String> {
        let mut runs = (Vec::new(), Vec::new());
        for _ in 0..o.repeats {
            runs.0.push(once(env, aggregate, o).await?);
            runs.1.push(once(env, none, o).await?);
        }
        let ratios = runs
            .0
            .iter()
            .zip(&runs.1)
            .map(|(x, y)| x.pg_us / y.pg_us)
            .collect();
        let a = summarize(aggregate, &runs.0, ceiling, report);
        let b = summarize(none, &runs.1, ceiling, report);
        self.done.insert(aggregate, a);
        self.done.insert(none, b);
        let ratio = report.add(
            format!(
                "PostgreSQL CPU per message, drain {} delete: ordering=aggregate / none",
                aggregate.queue.name()
            ),
            "×",
            ratios,
            format!(
                "ratio of each pair of drains run back to back, median; {:.1} µs / {:.1} µs (medians)",
                a.pg_us, b.pg_us
            ),
        );
        self.pg_ratios.insert(aggregate.queue, ratio);
        Ok(())
    }
}

/// The matrix (delete/mark × aggregate/none), the PostgreSQL CPU ratio,
/// and on the classic queue the drains of 100 aggregates and of one.
pub async fn run(
    drains: &mut Drains,
    env: &Env,
    queue: QueueType,
    o: &Options,
    ceiling: f64,
    report: &mut Report,
) -> Result<(), String> {
    for ordering in ["aggregate", "none"] {
        for mode in ["delete", "mark"] {
            let spec = Spec {
                queue,
                mode,
                ordering,
                aggregates: AGGREGATES,
                rows: o.rows,
            };
            drains.measure(env, spec, o, ceiling, report).await?;
        }
    }
    drains.pg_ratio(env, queue, o, ceiling, report).await?;
    if queue == QueueType::Classic {
        for spec in fewer_aggregates(o.rows) {
            drains.measure(env, spec, o, ceiling, report).await?;
        }
    }
    Ok(())
}

/// 100 aggregates, and one aggregate with half the rows (it moves slowest).
pub fn fewer_aggregates(rows: usize) -> [Spec; 2] {
    [
        Spec::classic("aggregate", 100, rows),
        Spec::classic("aggregate", 1, rows / 2),
    ]
}

/// What one drain measured.
struct Run {
    rate: f64,
    /// relay CPU per message, µs
    relay_us: f64,
    /// PostgreSQL CPU per message, µs
    pg_us: f64,
    rss_mb: f64,
    tally: Tally,
}

async fn measure(
    env: &Env,
    spec: Spec,
    o: &Options,
    ceiling: f64,
    report: &mut Report,
) -> Result<Outcome, String> {
    let mut runs = Vec::new();
    for _ in 0..o.repeats {
        runs.push(once(env, spec, o).await?);
    }
    Ok(summarize(spec, &runs, ceiling, report))
}

/// Reports the figures of `spec`'s runs; returns their medians.
fn summarize(spec: Spec, runs: &[Run], ceiling: f64, report: &mut Report) -> Outcome {
    let col = |f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let what = spec.name();
    let rate = median(&col(|r| r.rate));
    report.add(
        format!("drain {what}"),
        "msg/s",
        col(|r| r.rate),
        format!("{:.2} of ceiling ({ceiling:.0} msg/s)", rate / ceiling),
    );
    let relay_us = report.add(
        format!("relay CPU per message, drain {what}"),
        "µs",
        col(|r| r.relay_us),
        "user+system of the outboxd process",
    );
    let pg_us = report.add(
        format!("PostgreSQL CPU per message, drain {what}"),
        "µs",
        col(|r| r.pg_us),
        "user+system of every postgres process on the machine",
    );
    report.add(
        format!("relay RSS after drain {what}"),
        "MB",
        col(|r| r.rss_mb),
        "",
    );
    let order = spec.checks_order().then(|| {
        let tallies: Vec<Tally> = runs.iter().map(|r| r.tally).collect();
        crate::order::report(report, &format!("drain {what}"), &tallies)
    });
    Outcome {
        rate,
        pg_us,
        relay_us,
        order,
    }
}

/// One drain.
async fn once(env: &Env, spec: Spec, o: &Options) -> Result<Run, String> {
    let Spec {
        queue,
        mode,
        ordering,
        aggregates,
        rows,
    } = spec;
    let (db, url) = env.create_db("bench_drain").await?;
    env.migrate(&url).await?;
    env.fill(&url, rows, aggregates).await?;
    let (ch, exchange) = env.declare(queue).await?;
    let client = pg(&url).await?;
    let count_sql = if mode == "mark" {
        "SELECT count(*) FROM outbox WHERE published_at IS NULL"
    } else {
        "SELECT count(*) FROM outbox"
    };
    let config = relay_config(
        &url,
        &exchange,
        &format!(
            "after_publish = \"{mode}\"\nordering = \"{ordering}\"\n{}",
            o.source_extra
        ),
    );
    let relay = env.spawn_relay(&config).await?;
    let mark = CpuMark::now(Some(&relay));
    relay.wait_published(rows, "the drain").await?;
    let used = mark.report(&format!("drain {} CPU", spec.name()), Some(&relay));
    let (elapsed, pg_cpu) = (used.seconds, used.postgres * used.seconds);
    let left: i64 = client
        .query_one(count_sql, &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let queued = env.message_count(queue, &exchange).await? as usize;
    // More messages than rows are duplicates: an error, unless the order
    // check is there to count them.
    if left != 0 || queued < rows || (queued > rows && !spec.checks_order()) {
        return Err(format!(
            "drain ended with {left} rows left and {queued} of {rows} messages queued"
        ));
    }
    let cpu = relay.cpu_seconds();
    let rss_mb = relay.rss_mb();
    relay.stop().await;
    let tally = if spec.checks_order() {
        Tally::of(&read_back(env, queue, &exchange).await?)
    } else {
        Tally::default()
    };
    env.undeclare(&ch, &exchange).await;
    drop(client);
    env.drop_db(&db).await;
    Ok(Run {
        rate: rows as f64 / elapsed,
        relay_us: cpu * 1e6 / rows as f64,
        pg_us: pg_cpu * 1e6 / rows as f64,
        rss_mb,
        tally,
    })
}

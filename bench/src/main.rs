//! outboxd-bench: measures outboxd against the broker's own ceiling, in one run.
//!
//!   scripts/bench.sh [--quick] [--only ceiling,drain,scaleout,latency,overhead,footprint,recovery,goals,goal-drains,goal-latency,wal,claim-cost]
//!
//! `--only wal` runs the `capture = "wal"` flows (table rows and
//! `outbox_emit()` messages, over 1 and 1,000 aggregates) against the
//! classic ceiling.
//!
//! `--only goals` runs what the goals table of issue 10 needs (the classic
//! ceiling, four drains, scale-out with 1 and 3 relays, two latencies, the
//! recovery from a broker stop) and prints that table after the figures;
//! `--only goal-drains` runs only its four drains, and `--only
//! goal-latency` only its two latency loads (for paired runs of two
//! configs, and for looking into them).
//!
//! `--only claim-cost` (only when named) measures PostgreSQL's CPU for
//! each kind of claim alone, on the claiming backend (`claim_cost.rs`).
//!
//! It creates its own databases, exchanges and queues on the local
//! PostgreSQL and RabbitMQ, runs the release `outboxd` next to its own
//! executable, removes what it created, and prints a table plus one JSON
//! line per figure. Every figure is repeated (3 times by default) and
//! reported as the median with the min-max spread: the machines are
//! shared and noisy, so ratios measured in the same run are what count.

mod ceiling;
mod claim_cost;
mod drain;
mod env;
mod footprint;
mod goals;
mod latency;
mod order;
mod overhead;
mod proxy;
mod recovery;
mod report;
mod scaleout;
mod wal;

use std::collections::BTreeSet;

use report::Report;

pub struct Options {
    pub repeats: usize,
    /// Rows per drain run (100k by default).
    pub rows: usize,
    pub only: Option<BTreeSet<String>>,
    /// Extra `key = value` lines for the relay's `[[source]]` (from `--set`).
    pub source_extra: String,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut o = Options {
            repeats: 3,
            rows: 100_000,
            only: None,
            source_extra: String::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => {
                    o.repeats = 1;
                    o.rows = 20_000;
                }
                "--repeats" => o.repeats = next_num(&mut args, "--repeats")?,
                "--rows" => o.rows = next_num(&mut args, "--rows")?,
                "--only" => {
                    let v = args.next().ok_or("--only needs a list")?;
                    o.only = Some(v.split(',').map(str::to_owned).collect());
                }
                "--set" => {
                    let kv = args.next().ok_or("--set needs key=value")?;
                    let (k, v) = kv.split_once('=').ok_or("--set needs key=value")?;
                    o.source_extra.push_str(&format!("{k} = {v}\n"));
                }
                "-h" | "--help" => {
                    println!(
                        "usage: outboxd-bench [--quick] [--repeats N] [--rows N] [--only ceiling,drain,scaleout,latency,overhead,footprint,recovery,goals,goal-drains,goal-latency,wal,claim-cost] [--set source_key=toml_value ...]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        Ok(o)
    }

    pub fn wants(&self, part: &str) -> bool {
        self.only.as_ref().is_none_or(|s| s.contains(part))
    }
}

fn next_num(args: &mut impl Iterator<Item = String>, flag: &str) -> Result<usize, String> {
    args.next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{flag} needs a number"))
}

#[tokio::main]
async fn main() {
    let options = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("outboxd-bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&options).await {
        eprintln!("outboxd-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(o: &Options) -> Result<(), String> {
    let env = env::Env::new().await?;
    let mut report = Report::new();
    println!("# outboxd-bench: {}", env.describe());
    let mut ceilings = std::collections::HashMap::new();
    let mut measured = goals::Measured::default();
    for queue in [env::QueueType::Classic, env::QueueType::Quorum] {
        let classic = queue == env::QueueType::Classic;
        if o.wants("ceiling")
            || o.wants("drain")
            || o.wants("scaleout")
            || (classic && (o.wants("goals") || o.wants("goal-drains") || o.wants("wal")))
        {
            let c = ceiling::run(&env, queue, o, &mut report).await?;
            ceilings.insert(queue, c);
        }
        if o.wants("drain") {
            drain::run(
                &mut measured.drains,
                &env,
                queue,
                o,
                ceilings[&queue],
                &mut report,
            )
            .await?;
        }
        if o.wants("scaleout") && classic {
            scaleout::run(
                &mut measured.scaleout,
                &env,
                o,
                ceilings[&queue],
                &mut report,
            )
            .await?;
        }
    }
    if o.wants("wal")
        && let Some(c) = ceilings.get(&env::QueueType::Classic)
    {
        wal::run(&env, o, *c, &mut report).await?;
        // Commit→consumer at 100 and 1,000 rows/s, spread wide.
        let loads = [latency::LOADS[1], latency::LOADS[2]];
        latency::run_wal(&env, o, &mut report, &loads).await?;
        wal::overhead(&env, o, &mut report).await?;
    }
    if o.wants("latency") {
        let loads = [latency::LOADS.as_slice(), &latency::GOAL_LOADS].concat();
        let floors: Vec<u32> = latency::LOADS[..3].iter().map(|l| l.rate).collect();
        (measured.latency, measured.floors) =
            latency::run(&env, o, &mut report, &loads, &floors).await?;
    }
    if o.wants("goal-latency") && !o.wants("latency") {
        let rates: Vec<u32> = latency::GOAL_LOADS.iter().map(|l| l.rate).collect();
        latency::run(&env, o, &mut report, &latency::GOAL_LOADS, &rates).await?;
    }
    if o.only.as_ref().is_some_and(|s| s.contains("claim-cost")) {
        claim_cost::run(&env, o, &mut report).await?;
    }
    if o.wants("overhead") {
        overhead::run(&env, o, &mut report).await?;
    }
    if o.wants("footprint") {
        footprint::run(&env, o, &mut report).await?;
    }
    if o.wants("recovery") {
        measured.recovery = Some(recovery::run(&env, o, &mut report).await?);
    }
    let goals = match ceilings.get(&env::QueueType::Classic) {
        Some(c) if o.wants("goals") || o.wants("goal-drains") => {
            Some(goals::run(&env, o, *c, &mut measured, &mut report).await?)
        }
        _ => None,
    };
    report.print_table();
    if let Some(g) = goals {
        goals::print_table(&g);
    }
    Ok(())
}

//! `--only claim-cost` (never part of a default run): PostgreSQL's CPU for
//! one claim of each kind the relay makes under a backlog, measured on the
//! claiming backend itself (the nanoseconds on CPU in
//! `/proc/<pid>/schedstat` of its `pg_backend_pid()`),
//! with the statements the relay builds (`outboxd::source`), on a table of
//! `--rows` rows over 1,000 aggregates and a second session holding a
//! batch "in flight" (its rows locked `FOR UPDATE`) as the relay's other
//! batch would.
//!
//! What a drain's PostgreSQL CPU per message cannot show: which statement
//! the difference between `ordering = "aggregate"` and `"none"` is in.
//! (The settle, a delete by id, is the same statement in both.) Every
//! claim is rolled back, so each round sees the same table. The kinds
//! alternate within each round, so the machine's drift reaches them alike;
//! each figure is the median over the rounds, each ratio the median of the
//! rounds' ratios.

use outboxd::config::Config;
use outboxd::source::claim;
use outboxd::source::order::{self, LockKeys, PARTITIONS};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::Options;
use crate::env::{AMQP, Env, backend_on_cpu_seconds, pg};
use crate::report::{Report, median};

/// Claims per kind per round. Rounds are short (two claims of each kind),
/// so a drift of the machine's speed (other tenants) reaches the kinds of
/// a round alike: ratios are taken within each round.
const CLAIMS: usize = 2;
const ROUNDS: usize = 40;
const AGGREGATES: usize = 1000;

#[derive(Clone, Copy)]
enum Kind {
    /// `ordering = "none"` after the batch in flight: every claim of a
    /// backlog drain but one per poll tick.
    NoneAfter,
    /// `"none"` from the head of the table, past the locked batch: the
    /// claim of each poll tick during a backlog.
    NoneHead,
    /// `"aggregate"` over half the partitions while the other half's batch
    /// is in flight: the steady state of a one-relay drain (two batches,
    /// each holding a range of the partitions, as the lock gives them).
    /// The walk passes the other half's rows inside the claim index.
    AggregateHalf,
    /// `"aggregate"` over every partition, nothing in flight: the walk
    /// passes no row of another batch.
    AggregateAll,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::NoneAfter,
        Kind::NoneHead,
        Kind::AggregateHalf,
        Kind::AggregateAll,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::NoneAfter => "none, after the batch in flight",
            Kind::NoneHead => "none, from the head past the batch in flight",
            Kind::AggregateHalf => {
                "aggregate, half the partitions, the other half's batch in flight"
            }
            Kind::AggregateAll => "aggregate, every partition, nothing in flight",
        }
    }
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> Result<(), String> {
    let (db, url) = env.create_db("bench_claims").await?;
    let result = measure(env, &url, o, report).await;
    env.drop_db(&db).await;
    result
}

async fn measure(env: &Env, url: &str, o: &Options, report: &mut Report) -> Result<(), String> {
    env.migrate(url).await?;
    env.fill(url, o.rows, AGGREGATES).await?;
    let text = format!(
        "[rabbitmq]\nurl = \"{AMQP}\"\n[[source]]\nname = \"b\"\ndatabase_url = \"{url}\"\nordering = \"aggregate\"\n"
    );
    let config = Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let source = &config.sources[0];
    let limit = source.batch_size as i64;
    let walk_sql = order::Sql::new(source);
    let none_claim = claim::sql(&source.table);
    let savepoint = format!("SAVEPOINT {}", claim::BATCH_SAVEPOINT);
    let batch_key = LockKeys::new(&source.table).batch;
    let low: Vec<i32> = (0..PARTITIONS / 2).collect();
    let high: Vec<i32> = (PARTITIONS / 2..PARTITIONS).collect();
    let all: Vec<i32> = (0..PARTITIONS).collect();

    let claimer = pg(url).await?;
    let locker = pg(url).await?;
    let pid: i32 = claimer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let lock = claimer
        .prepare(walk_sql.lock_for(1))
        .await
        .map_err(|e| e.to_string())?;
    let walk = claimer
        .prepare(&walk_sql.claim)
        .await
        .map_err(|e| e.to_string())?;
    let none = claimer
        .prepare(&none_claim)
        .await
        .map_err(|e| e.to_string())?;
    // The batch in flight: the first `limit` rows of the table, or of the
    // upper half of the partitions, locked by the other session.
    let first_rows = format!("SELECT id FROM outbox ORDER BY id LIMIT {limit}");
    let high_rows = format!(
        "SELECT id FROM outbox o WHERE {} = ANY('{{{}}}'::int[]) ORDER BY id LIMIT {limit}",
        order::partition_of("o."),
        high.iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );

    let mut per_claim: Vec<Vec<f64>> = vec![Vec::new(); Kind::ALL.len()];
    let mut rows_of: Vec<usize> = vec![0; Kind::ALL.len()];
    for _ in 0..ROUNDS {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            let in_flight = match kind {
                Kind::NoneAfter | Kind::NoneHead => Some(&first_rows),
                Kind::AggregateHalf => Some(&high_rows),
                Kind::AggregateAll => None,
            };
            let frontier = match in_flight {
                Some(sql) => hold(&locker, sql).await?,
                None => 0,
            };
            let before = backend_on_cpu_seconds(pid);
            for _ in 0..CLAIMS {
                claimer
                    .batch_execute("BEGIN")
                    .await
                    .map_err(|e| e.to_string())?;
                let rows = match kind {
                    Kind::NoneAfter | Kind::NoneHead => {
                        claimer
                            .batch_execute(&savepoint)
                            .await
                            .map_err(|e| e.to_string())?;
                        let after = if matches!(kind, Kind::NoneAfter) {
                            frontier
                        } else {
                            0
                        };
                        claimer.query(&none, &[&limit, &after]).await
                    }
                    Kind::AggregateHalf | Kind::AggregateAll => {
                        let free = if matches!(kind, Kind::AggregateHalf) {
                            &low
                        } else {
                            &all
                        };
                        // As a draining relay asks: every free partition,
                        // no look at the front (the free ones are all taken).
                        // (The look, as the relay sizes it, goes unused then.)
                        let most = free.len() as i64;
                        let look = claim::look(most, limit, false);
                        let params: [&(dyn ToSql + Sync); 5] =
                            [&free, &look, &batch_key, &most, &1i64];
                        claimer
                            .query_one(&lock, &params)
                            .await
                            .map_err(|e| e.to_string())?;
                        claimer
                            .batch_execute(&savepoint)
                            .await
                            .map_err(|e| e.to_string())?;
                        claimer.query(&walk, &[&limit]).await
                    }
                }
                .map_err(|e| format!("claim {}: {e}", kind.name()))?;
                rows_of[i] = rows.len();
                claimer
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let used = backend_on_cpu_seconds(pid) - before;
            per_claim[i].push(used * 1e3 / CLAIMS as f64);
            if in_flight.is_some() {
                locker
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        let ms = median(&per_claim[i]);
        // Against the first kind's claims of the same round: a round's
        // drift reaches both.
        let ratios: Vec<f64> = per_claim[i]
            .iter()
            .zip(&per_claim[0])
            .map(|(k, base)| k / base.max(f64::EPSILON))
            .collect();
        report.add(
            format!("claim CPU, {}", kind.name()),
            "ms",
            per_claim[i].clone(),
            format!(
                "{} rows a claim, {:.2} µs a row; {ROUNDS} rounds of {CLAIMS} claims, {} rows over {AGGREGATES} aggregates",
                rows_of[i],
                ms * 1e3 / rows_of[i].max(1) as f64,
                o.rows
            ),
        );
        if i > 0 {
            report.add(
                format!("claim CPU, {} / {}", kind.name(), Kind::ALL[0].name()),
                "×",
                ratios,
                "per round, medians",
            );
        }
    }
    Ok(())
}

/// Opens a transaction on `locker` that locks the rows of `sql`, as a
/// batch in flight does; returns the highest id it locked.
async fn hold(locker: &Client, sql: &str) -> Result<i64, String> {
    locker
        .batch_execute("BEGIN")
        .await
        .map_err(|e| e.to_string())?;
    let row = locker
        .query_one(
            &format!("SELECT coalesce(max(id), 0) FROM ({sql} FOR UPDATE) s"),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

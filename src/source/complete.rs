//! Step 5: settle a batch in the claim transaction, as the relay planned
//! it ([`Plan`]). Delivered rows are deleted (or marked). A failed row is
//! either retried (`attempts + 1`, its `last_error`, and an `available_at`
//! in the future, so it steps aside for the backoff time while the rest of
//! the table keeps flowing) or parked: moved to the dead-letter table,
//! where it no longer blocks anything and an operator can see it and
//! replay it. With `ordering = "aggregate"` the next row of each delivered
//! aggregate is released. Whether to retry or park is the relay's choice
//! (`relay::decide`).

use deadpool_postgres::Object;
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use crate::config::AfterPublish;
use crate::ident::TableName;
use crate::telemetry::ErrorChain;

/// `last_error` is for people; a few hundred bytes say enough.
const MAX_ERROR_CHARS: usize = 500;

pub struct Sql {
    delivered: String,
    failed: String,
    parked: String,
    /// $1 row ids: rows that wait behind an earlier row of their aggregate
    /// (a failed one here; one outside the walk for pipelined claims).
    pub(super) hold: String,
    /// `ordering = "aggregate"`: release the next row of each aggregate.
    release_next: Option<String>,
}

/// `attempts + 1`, stopping at the largest integer instead of failing the
/// statement (a row with `attempts = 2147483647` is still settled).
const NEXT_ATTEMPT: &str = "LEAST(COALESCE(o.attempts, 0), 2147483646) + 1";

impl Sql {
    pub fn new(table: &TableName, after: AfterPublish, release_next: Option<String>) -> Self {
        let t = table.quoted();
        let dead = table.sibling("_dead");
        let delivered = match after {
            AfterPublish::Delete => format!("DELETE FROM {t} WHERE id = ANY($1)"),
            AfterPublish::Mark => {
                format!("UPDATE {t} SET published_at = clock_timestamp() WHERE id = ANY($1)")
            }
        };
        let failed = format!(
            "UPDATE {t} AS o SET attempts = {NEXT_ATTEMPT}, last_error = f.err, \
                 available_at = clock_timestamp() + f.delay_ms * interval '1 millisecond' \
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS f(id, err, delay_ms) \
             WHERE o.id = f.id"
        );
        // The dead-letter table requires values the outbox may lack (a
        // producer may have dropped a NOT NULL): a row is parked whatever
        // it holds, with stand-ins for what is missing.
        let parked = format!(
            "WITH moved AS (DELETE FROM {t} WHERE id = ANY($1) RETURNING *) \
             INSERT INTO {dead} (id, aggregate_type, aggregate_id, event_type, payload, headers, \
                 dedup_key, exchange, routing_key, created_at, attempts, last_error, reason, parked_at) \
             SELECT o.id, COALESCE(o.aggregate_type, ''), COALESCE(o.aggregate_id, ''), \
                 COALESCE(o.event_type, ''), COALESCE(o.payload, 'null'::jsonb), \
                 COALESCE(o.headers, '{{}}'::jsonb), COALESCE(o.dedup_key, ''), o.exchange, o.routing_key, \
                 COALESCE(o.created_at, clock_timestamp()), {NEXT_ATTEMPT}, p.err, p.reason, \
                 clock_timestamp() \
             FROM moved o JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS p(id, err, reason) \
                 ON p.id = o.id"
        );
        let hold = format!("UPDATE {t} SET held = true WHERE id = ANY($1)");
        Self {
            delivered,
            failed,
            parked,
            hold,
            release_next,
        }
    }
}

/// What to do with each row of a batch once the broker has answered.
#[derive(Default)]
pub struct Plan {
    /// Rows the broker took: delete (or mark) them.
    pub delivered: Vec<i64>,
    /// Rows to try again later: (id, error, delay in ms).
    pub retry: Vec<(i64, String, i64)>,
    /// Rows to move to the dead-letter table: (id, error, reason label).
    pub park: Vec<(i64, String, &'static str)>,
    /// Ordered: rows behind a failed row of their aggregate in this batch.
    /// Whatever the broker answered for them, they stay in the outbox,
    /// held, and go again in order once the failed row is delivered.
    pub hold: Vec<i64>,
    /// Ordered: (failed row, later row of its aggregate the broker took):
    /// a consumer saw the later row first.
    pub order_breaks: Vec<(i64, i64)>,
    /// Each row's delay in ms for a retry, should its delivered or parked
    /// settlement be refused by the database.
    pub fallback_delay_ms: Vec<(i64, i64)>,
    /// `ordering = "aggregate"`: (types, ids) of the aggregates whose next
    /// row may go now.
    pub release: Option<(Vec<String>, Vec<String>)>,
}

impl Plan {
    pub fn retry(&mut self, id: i64, error: &str, delay_ms: i64) {
        self.retry.push((id, clip(error), delay_ms));
    }

    pub fn park(&mut self, id: i64, error: &str, reason: &'static str) {
        self.park.push((id, clip(error), reason));
    }

    fn fallback_delay(&self, id: i64) -> i64 {
        self.fallback_delay_ms
            .iter()
            .find(|(i, _)| *i == id)
            .map_or(1000, |(_, d)| *d)
    }
}

fn clip(error: &str) -> String {
    error.chars().take(MAX_ERROR_CHARS).collect()
}

/// What settling came to, once the transaction commits.
#[derive(Debug, Default)]
pub struct Settled {
    /// Rows moved to the dead-letter table.
    pub parked: Vec<i64>,
    /// Rows the database would not settle as planned (a delivered row it
    /// would not delete, a row it would not park): they were rescheduled
    /// with backoff instead, with this error in `last_error`.
    pub rescheduled: Vec<(i64, String)>,
    /// Rows the database would not even reschedule: left as they were
    /// (they are claimed again; the loop pauses the source meanwhile).
    pub untouched: Vec<(i64, String)>,
    /// The release of the next rows failed (the sweep releases them later).
    pub release_failed: Option<String>,
}

/// Settles a batch in its claim transaction (the caller commits), under
/// the savepoint its claim opened (`claim::BATCH_SAVEPOINT`).
///
/// Everything is tried in a few set-wise statements first. If the database
/// refuses one of them (a row it will not delete, a dead letter with the
/// same id, a trigger of the producer's), the batch rolls back to its
/// savepoint (its row locks and the claim's held marks go; with ordering
/// its partition locks stay, so no other batch takes the rows meanwhile;
/// with `ordering = "none"` another batch may claim and send one again, a
/// duplicate in a path taken only when the database refuses) and goes again
/// row by row, each under a savepoint of its own, so one row the database
/// refuses cannot undo the rest of the batch and have their messages sent
/// again and again: a delivered row that cannot be removed, or a bad row
/// that cannot be parked, is rescheduled with backoff instead, its
/// `last_error` saying why. Only an error of the connection itself fails
/// the whole batch.
pub async fn settle(tx: &Object, sql: &Sql, plan: &Plan) -> Result<Settled, tokio_postgres::Error> {
    let savepoint = super::claim::BATCH_SAVEPOINT;
    match settle_all(tx, sql, plan).await {
        // The savepoint is left open: the commit that follows commits it
        // with the transaction.
        Ok(()) => Ok(Settled {
            parked: plan.park.iter().map(|(id, _, _)| *id).collect(),
            ..Settled::default()
        }),
        Err(err) if err.code().is_none() => Err(err),
        Err(_) => {
            tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {savepoint}"))
                .await?;
            settle_each(tx, sql, plan).await
        }
    }
}

/// Every set-wise statement of the plan, pipelined: sent together and run
/// in this order in one round trip (tokio-postgres pipelines requests that
/// are polled together, in the order they are first polled). If one fails,
/// those after it fail too (the transaction is aborted) and the first
/// error, the one that matters, is returned.
async fn settle_all(tx: &Object, sql: &Sql, plan: &Plan) -> Result<(), tokio_postgres::Error> {
    let retry_ids: Vec<i64> = plan.retry.iter().map(|r| r.0).collect();
    let retry_errors: Vec<&str> = plan.retry.iter().map(|r| r.1.as_str()).collect();
    let retry_delays: Vec<i64> = plan.retry.iter().map(|r| r.2).collect();
    let park_ids: Vec<i64> = plan.park.iter().map(|r| r.0).collect();
    let park_errors: Vec<&str> = plan.park.iter().map(|r| r.1.as_str()).collect();
    let park_reasons: Vec<&str> = plan.park.iter().map(|r| r.2).collect();
    let delivered: [&(dyn ToSql + Sync); 1] = [&plan.delivered];
    let failed: [&(dyn ToSql + Sync); 3] = [&retry_ids, &retry_errors, &retry_delays];
    let parked: [&(dyn ToSql + Sync); 3] = [&park_ids, &park_errors, &park_reasons];
    let hold: [&(dyn ToSql + Sync); 1] = [&plan.hold];
    let (release_sql, release): (Option<&String>, [&(dyn ToSql + Sync); 2]) =
        match (&sql.release_next, &plan.release) {
            (Some(release), Some((types, ids))) => (Some(release), [types, ids]),
            _ => (None, [&NO_ROWS, &NO_ROWS]),
        };
    // Prepared one after the other: a round trip each, but only the first
    // time on a connection (the statements are cached).
    let delivered_stmt = prepare_if(tx, !plan.delivered.is_empty(), Some(&sql.delivered)).await?;
    let failed_stmt = prepare_if(tx, !plan.retry.is_empty(), Some(&sql.failed)).await?;
    let parked_stmt = prepare_if(tx, !plan.park.is_empty(), Some(&sql.parked)).await?;
    let hold_stmt = prepare_if(tx, !plan.hold.is_empty(), Some(&sql.hold)).await?;
    let release_stmt = prepare_if(tx, true, release_sql).await?;
    tokio::try_join!(
        execute_if(tx, delivered_stmt.as_ref(), &delivered),
        execute_if(tx, failed_stmt.as_ref(), &failed),
        execute_if(tx, parked_stmt.as_ref(), &parked),
        execute_if(tx, hold_stmt.as_ref(), &hold),
        execute_if(tx, release_stmt.as_ref(), &release),
    )?;
    Ok(())
}

/// A placeholder parameter for a statement that is not run.
static NO_ROWS: Vec<i64> = Vec::new();

async fn prepare_if(
    tx: &Object,
    wanted: bool,
    sql: Option<&String>,
) -> Result<Option<Statement>, tokio_postgres::Error> {
    match sql {
        Some(sql) if wanted => Ok(Some(tx.prepare_cached(sql).await?)),
        _ => Ok(None),
    }
}

async fn execute_if(
    tx: &Object,
    stmt: Option<&Statement>,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    match stmt {
        Some(stmt) => tx.execute(stmt, params).await,
        None => Ok(0),
    }
}

/// The slow path: each row on its own, under a savepoint.
async fn settle_each(
    tx: &Object,
    sql: &Sql,
    plan: &Plan,
) -> Result<Settled, tokio_postgres::Error> {
    let mut out = Settled::default();
    let mut reschedule: Vec<(i64, String)> = Vec::new();
    for &id in &plan.delivered {
        if let Err(e) = one(tx, &sql.delivered, &[&vec![id]]).await? {
            reschedule.push((
                id,
                format!(
                    "delivered, but the database refused to remove it ({e}); it will be sent again"
                ),
            ));
        }
    }
    for (id, error, delay) in &plan.retry {
        let params: [&(dyn ToSql + Sync); 3] = [&vec![*id], &vec![error.as_str()], &vec![*delay]];
        if let Err(e) = one(tx, &sql.failed, &params).await? {
            out.untouched.push((*id, format!("cannot reschedule: {e}")));
        }
    }
    for (id, error, reason) in &plan.park {
        let params: [&(dyn ToSql + Sync); 3] = [&vec![*id], &vec![error.as_str()], &vec![*reason]];
        match one(tx, &sql.parked, &params).await? {
            Ok(()) => out.parked.push(*id),
            Err(e) => reschedule.push((*id, format!("cannot be parked ({e}): {error}"))),
        }
    }
    for (id, error) in reschedule {
        let error = clip(&error);
        let delay = plan.fallback_delay(id);
        let params: [&(dyn ToSql + Sync); 3] = [&vec![id], &vec![error.as_str()], &vec![delay]];
        match one(tx, &sql.failed, &params).await? {
            Ok(()) => out.rescheduled.push((id, error)),
            Err(e) => out
                .untouched
                .push((id, format!("{error}; cannot reschedule either: {e}"))),
        }
    }
    // Unheld, they would not go out of order either: the next claim finds
    // the failed row before them and holds them itself.
    if !plan.hold.is_empty()
        && let Err(e) = one(tx, &sql.hold, &[&plan.hold]).await?
    {
        out.release_failed = Some(format!("holding rows behind a failed one: {e}"));
    }
    if let (Some(release), Some((types, ids))) = (&sql.release_next, &plan.release)
        && let Err(e) = one(tx, release, &[types, ids]).await?
    {
        out.release_failed = Some(e.to_string());
    }
    Ok(out)
}

/// PostgreSQL refused one statement (the transaction goes on).
struct Refusal(tokio_postgres::Error);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres keeps the server's message in the cause.
        write!(f, "{}", ErrorChain(&self.0))
    }
}

/// Runs one statement under a savepoint. The outer `Err` is the connection
/// failing (the batch is lost); the inner one is the database refusing
/// this statement, already rolled back to the savepoint.
async fn one(
    tx: &Object,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Result<(), Refusal>, tokio_postgres::Error> {
    tx.batch_execute("SAVEPOINT outboxd_row").await?;
    let result = async {
        let stmt = tx.prepare_cached(sql).await?;
        tx.execute(&stmt, params).await
    }
    .await;
    match result {
        Ok(_) => {
            tx.batch_execute("RELEASE SAVEPOINT outboxd_row").await?;
            Ok(Ok(()))
        }
        Err(err) if err.code().is_none() => Err(err),
        Err(err) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT outboxd_row")
                .await?;
            Ok(Err(Refusal(err)))
        }
    }
}

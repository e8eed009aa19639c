//! The polling capture: a [`Source`] claims with `FOR UPDATE SKIP LOCKED`
//! in a transaction it holds until the batch is settled (`claim.rs`,
//! `complete.rs`), and wakes on NOTIFY (`wakeup.rs`, `flag.rs`).

use std::sync::Arc;

use tokio::sync::{Notify, watch};

use super::capture::{Capture, Claim, ClaimFrom, FlagSet};
use super::claim::PollBatch;
use super::complete::{self, Plan, Settled};
use super::{DbError, Source, flag, step};

impl Capture for Source {
    type Batch = PollBatch;

    async fn claim(&self, from: ClaimFrom) -> Result<Claim<PollBatch>, DbError> {
        super::claim::claim(self, from).await
    }

    async fn can_park(&self, batch: &PollBatch) -> Result<bool, DbError> {
        self.dead.exists(batch.client()).await
    }

    async fn settle(&self, batch: PollBatch, plan: &Plan) -> Result<Settled, DbError> {
        let settled = step(
            "settle",
            complete::settle(batch.client(), &self.queries.complete, plan),
        )
        .await?;
        batch.commit().await?;
        Ok(settled)
    }

    async fn give_back(&self, batch: PollBatch) -> Result<(), DbError> {
        batch.rollback().await
    }

    async fn set_flag(&self, armed: bool) -> Result<FlagSet, DbError> {
        flag::set(self, armed).await
    }

    async fn sweep(&self) -> Result<u64, DbError> {
        let client = step("get a connection", self.pool.get()).await?;
        let sql = if self.dead.look(&client).await? {
            &self.queries.order.sweep
        } else {
            &self.queries.order.sweep_no_dead
        };
        step("release held rows", client.execute(sql, &[])).await
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }

    fn partitions(&self) -> watch::Receiver<Arc<Vec<i32>>> {
        self.partitions.subscribe()
    }

    fn upkeep(&self) {
        super::pool::reap_idle(&self.pool);
    }

    fn after_error(&self) {
        self.dead.forget();
    }
}

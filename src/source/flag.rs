//! The wake-up flag: a one-row table beside the outbox (see `sql/outbox.sql`).
//!
//! The relay arms it when a claim comes back empty (it has caught up) and
//! disarms it when a claim finds rows (it is busy). The outbox trigger reads
//! it at each producer's commit and sends NOTIFY only while it is armed, so
//! producers pay NOTIFY's commit-time lock only when the relay is idle.
//!
//! A producer that read "disarmed" just before the flag was armed sends no
//! notification, and its rows may become visible just after the relay's
//! next claim; the relay therefore claims twice after arming (at once and
//! [`RECHECK_AFTER_ARM`] later), and the fallback poll covers the rest.

use tokio_postgres::error::SqlState;

use super::{DB_TIMEOUT, DbError, FlagSet, Source, step};
use crate::ident::TableName;
use crate::telemetry::ErrorChain;

/// The second look after arming: longer than a commit's WAL flush takes on
/// any healthy disk.
pub const RECHECK_AFTER_ARM: std::time::Duration = std::time::Duration::from_millis(20);

pub struct Sql {
    arm: String,
    disarm: String,
}

impl Sql {
    pub fn new(table: &TableName) -> Self {
        let flag = table.sibling("_wakeup");
        Self {
            // Conditional updates: a flag already in the wanted state costs no write.
            arm: format!("UPDATE {flag} SET armed = true WHERE NOT armed"),
            disarm: format!("UPDATE {flag} SET armed = false WHERE armed"),
        }
    }
}

/// Arms (`true`) or disarms (`false`) the flag, in its own short transaction.
pub async fn set(source: &Source, armed: bool) -> Result<FlagSet, DbError> {
    let what = if armed {
        "arm the wake-up flag"
    } else {
        "disarm the wake-up flag"
    };
    let sql = if armed {
        &source.queries.flag.arm
    } else {
        &source.queries.flag.disarm
    };
    let client = step("get a connection", source.pool.get()).await?;
    match tokio::time::timeout(DB_TIMEOUT, client.execute(sql, &[])).await {
        Ok(Ok(_)) => Ok(FlagSet::Done),
        Ok(Err(e)) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
            Ok(FlagSet::Missing(ErrorChain(&e).to_string()))
        }
        Ok(Err(e)) => Err(DbError::Failed {
            step: what,
            source: Box::new(e),
        }),
        Err(_) => Err(DbError::TimedOut { step: what }),
    }
}

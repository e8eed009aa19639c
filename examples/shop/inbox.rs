//! The consumer side: the inbox of `sql/inbox.sql`. A message's id goes in
//! in the same transaction as the change the message causes; a second copy
//! finds it there and changes nothing. See the README, "Consuming:
//! exactly-once effects".

use deadpool_postgres::Transaction;

use crate::shop::error::Error;

/// The inbox table, as users create it by hand (`psql -f sql/inbox.sql`).
pub const SQL: &str = include_str!("../../sql/inbox.sql");

/// Records `message_id` in the caller's transaction. True: the first
/// delivery, so make the change now, in this transaction. False: a
/// duplicate, counted on its inbox row; change nothing.
pub async fn record(tx: &Transaction<'_>, message_id: &str, kind: &str) -> Result<bool, Error> {
    let inserted = tx
        .execute(
            "INSERT INTO inbox (message_id, message_type) VALUES ($1, $2) \
             ON CONFLICT (message_id) DO NOTHING",
            &[&message_id, &kind],
        )
        .await?;
    if inserted == 1 {
        return Ok(true);
    }
    tx.execute(
        "UPDATE inbox SET duplicates = duplicates + 1, last_duplicate_at = now() \
         WHERE message_id = $1",
        &[&message_id],
    )
    .await?;
    Ok(false)
}

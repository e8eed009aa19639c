//! Which relay owns which partitions: each relay joins the table with a
//! shared member lock, counts the others, and takes or gives back
//! partition locks until it holds its fair share (see `order.rs`).

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::{LockKeys, PARTITIONS, Sql};

/// `outboxd status`: each relay on the table, found by its member lock
/// (held by its listener's session; see `join_sql`), with the session's
/// application_name, client address, start, and the partitions it holds.
/// $1 member key, $2 partition key.
pub const RELAYS_SQL: &str = "SELECT m.pid, COALESCE(a.application_name, ''), \
        CASE WHEN a.client_addr IS NULL THEN NULL ELSE host(a.client_addr) || ':' || a.client_port END, \
        to_json(a.backend_start) #>> '{}', \
        COALESCE((SELECT array_agg(p.objid::int ORDER BY p.objid) FROM pg_catalog.pg_locks p \
            WHERE p.pid = m.pid AND p.locktype = 'advisory' AND p.granted AND p.objsubid = 2 \
              AND p.database = m.database \
              AND p.classid = (hashtext($2)::bigint & 4294967295)::oid), '{}') \
    FROM pg_catalog.pg_locks m LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = m.pid \
    WHERE m.locktype = 'advisory' AND m.granted AND m.objid = 0 AND m.objsubid = 2 \
      AND m.classid = (hashtext($1)::bigint & 4294967295)::oid \
      AND m.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) \
    ORDER BY a.backend_start, m.pid";

/// How many partitions a relay should own when `members` relays run.
pub fn fair_share(members: i32) -> usize {
    let members = members.max(1);
    ((PARTITIONS + members - 1) / members) as usize
}

/// Which partitions to let go of and which to try for, given what we own
/// and our fair share. Tries start at `offset` so relays that start
/// together do not all reach for the same partitions.
pub fn plan(owned: &BTreeSet<i32>, share: usize, offset: i32) -> (Vec<i32>, Vec<i32>) {
    if owned.len() > share {
        let release = owned
            .iter()
            .rev()
            .take(owned.len() - share)
            .copied()
            .collect();
        return (release, Vec::new());
    }
    let wanted = (0..PARTITIONS)
        .map(|i| (i + offset).rem_euclid(PARTITIONS))
        .filter(|p| !owned.contains(p))
        .collect();
    (Vec::new(), wanted)
}

/// Joins the table's relays (a shared session lock on the member key),
/// as a statement for the listener's LISTEN batch.
pub fn join_sql(keys: &LockKeys) -> String {
    format!(
        "SELECT pg_advisory_lock_shared(hashtext({}), 0)",
        crate::ident::quote_literal(&keys.member)
    )
}

/// One turn of the rebalance: count the relays, then give back or take
/// partitions until we hold our fair share. Returns what we own now and
/// how many relays there are.
pub async fn rebalance(
    client: &Client,
    sql: &Sql,
    keys: &LockKeys,
    mut owned: BTreeSet<i32>,
    offset: i32,
) -> Result<(BTreeSet<i32>, i32), tokio_postgres::Error> {
    let members: i32 = client
        .query_one(&sql.members, &[&keys.member])
        .await?
        .try_get(0)?;
    let share = fair_share(members);
    let (release, wanted) = plan(&owned, share, offset);
    if !release.is_empty() {
        client
            .execute(
                "SELECT pg_advisory_unlock(hashtext($1), p) FROM unnest($2::int[]) AS p",
                &[&keys.partition, &release],
            )
            .await?;
        for p in &release {
            owned.remove(p);
        }
    }
    let missing = share.saturating_sub(owned.len()) as i64;
    if missing > 0 {
        let row = client
            .query_one(
                "SELECT COALESCE(array_agg(p), '{}') FROM ( \
                   SELECT c.p FROM unnest($2::int[]) WITH ORDINALITY AS c(p, n) \
                   WHERE pg_try_advisory_lock(hashtext($1), c.p) LIMIT $3) l",
                &[&keys.partition, &wanted, &missing],
            )
            .await?;
        let got: Vec<i32> = row.try_get(0)?;
        owned.extend(got);
    }
    Ok((owned, members))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_partition() {
        for members in 1..=70 {
            let share = fair_share(members);
            assert!(
                share * members as usize >= PARTITIONS as usize,
                "{members} relays"
            );
            assert!(share >= 1);
        }
        assert_eq!(fair_share(1), 64);
        assert_eq!(fair_share(3), 22);
        assert_eq!(fair_share(0), 64);
    }

    #[test]
    fn plans_to_release_the_excess_or_take_the_rest() {
        let owned: BTreeSet<i32> = (0..40).collect();
        // Too many: give back the highest ones, take nothing.
        let (release, wanted) = plan(&owned, 32, 0);
        assert_eq!(release, (32..40).rev().collect::<Vec<_>>());
        assert!(wanted.is_empty());
        // Too few: try every partition we do not own, from the offset on.
        let owned: BTreeSet<i32> = [1, 2].into();
        let (release, wanted) = plan(&owned, 32, 63);
        assert!(release.is_empty());
        assert_eq!(wanted.len(), 62);
        assert_eq!(&wanted[..3], &[63, 0, 3]);
    }
}

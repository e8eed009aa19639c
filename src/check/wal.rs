//! `check` for a `capture = "wal"` source: the server setting, the role's
//! right to replicate, the publication, the slot, and the limit on the
//! WAL a slot may keep.

use std::io::Write;

use tokio_postgres::Client;

use super::{Level, Report};
use crate::config::SourceConfig;
use crate::ident::quote_ident;
use crate::wal::upkeep::slot_problem;

/// `capture = "wal"`: the server setting, the role's right to replicate,
/// the publication, the slot, and the limit on the WAL a slot may keep.
pub(super) async fn check<W: Write>(
    r: &mut Report<W>,
    client: &Client,
    source: &SourceConfig,
    wal: &crate::config::WalCapture,
) -> Result<(), tokio_postgres::Error> {
    let what = |part: &str| format!("source {} {part}", source.name);
    let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if level == "logical" {
        r.line(Level::Ok, &what("wal_level"), "logical");
    } else {
        r.line(
            Level::Fail,
            &what("wal_level"),
            &format!("is {level}; capture = \"wal\" needs wal_level = logical (a server restart)"),
        );
    }
    let role = client
        .query_one(
            "SELECT rolname::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (name, replication, superuser): (String, bool, bool) =
        (role.get(0), role.get(1), role.get(2));
    if replication || superuser {
        let how = if superuser {
            "a superuser"
        } else {
            "REPLICATION"
        };
        r.line(
            Level::Ok,
            &what("replication role"),
            &format!("{name:?} is {how}"),
        );
    } else {
        r.line(
            Level::Fail,
            &what("replication role"),
            &format!(
                "{name:?} has no REPLICATION attribute (ALTER ROLE {} REPLICATION)",
                quote_ident(&name)
            ),
        );
    }
    let publication = client
        .query_opt(
            "SELECT p.pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t \
                 WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&wal.publication, &source.table.schema, &source.table.table],
        )
        .await?;
    match publication {
        None => r.line(
            Level::Fail,
            &what("publication"),
            &format!(
                "{:?} does not exist; run `outboxd migrate`",
                wal.publication
            ),
        ),
        Some(p) if !p.get::<_, bool>(0) || !p.get::<_, bool>(1) => r.line(
            Level::Fail,
            &what("publication"),
            &format!(
                "{:?} must publish inserts of {} (it was not made by migrate?)",
                wal.publication, source.table
            ),
        ),
        Some(_) => r.line(
            Level::Ok,
            &what("publication"),
            &format!(
                "{:?} publishes the inserts of {}",
                wal.publication, source.table
            ),
        ),
    }
    let slot = client
        .query_opt(
            "SELECT plugin::text, wal_status, temporary, database::text = current_database(), \
                 pg_size_pretty((pg_current_wal_lsn() - restart_lsn)::bigint), active \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&wal.slot],
        )
        .await?;
    match slot {
        None => r.line(
            Level::Fail,
            &what("slot"),
            &format!("{:?} does not exist; run `outboxd migrate`", wal.slot),
        ),
        Some(s) => {
            let plugin: Option<String> = s.get(0);
            let status: Option<String> = s.get(1);
            let same_db: Option<bool> = s.get(3);
            let retained: Option<String> = s.get(4);
            let active: bool = s.get(5);
            let problem = if same_db != Some(true) {
                Some("it belongs to another database; drop it or name another slot".to_owned())
            } else {
                slot_problem(status.as_deref(), plugin.as_deref())
            };
            if let Some(problem) = problem {
                r.line(
                    Level::Fail,
                    &what("slot"),
                    &format!("{:?} is not usable: {problem}", wal.slot),
                );
            } else {
                r.line(
                    Level::Ok,
                    &what("slot"),
                    &format!(
                        "{:?} (pgoutput, {}), keeps {} of WAL{}",
                        wal.slot,
                        status.unwrap_or_default(),
                        retained.unwrap_or_else(|| "0 bytes".into()),
                        if active { ", in use" } else { "" }
                    ),
                );
            }
        }
    }
    let keep: String = client
        .query_one("SHOW max_slot_wal_keep_size", &[])
        .await?
        .get(0);
    if keep == "-1" {
        r.line(
            Level::Warn,
            &what("max_slot_wal_keep_size"),
            "is -1 (no limit): a stopped relay makes its slot keep WAL until the disk is full; set a limit",
        );
    } else {
        r.line(Level::Ok, &what("max_slot_wal_keep_size"), &keep);
    }
    Ok(())
}

//! One fresh PostgreSQL database per test, dropped when the test ends.

use tokio_postgres::{Client, NoTls};

use super::{PG_URL, unique};

pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
    /// `insert_one` gives each row its own aggregate (o-1, o-2, ...): with
    /// `ordering = "aggregate"` a failing row holds back only its own.
    next_aggregate: std::sync::atomic::AtomicU32,
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (is PostgreSQL running?)"));
    tokio::spawn(connection);
    client
}

impl TestDb {
    /// Creates an empty database.
    pub async fn empty(prefix: &str) -> Self {
        let name = unique(prefix);
        let admin = connect(&format!("{PG_URL}/postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        let url = format!("{PG_URL}/{name}");
        let client = connect(&url).await;
        Self {
            name,
            url,
            client,
            next_aggregate: std::sync::atomic::AtomicU32::new(1),
        }
    }

    /// Creates a database with the outbox table, via outboxd's own migration SQL.
    pub async fn migrated(prefix: &str) -> Self {
        let db = Self::empty(prefix).await;
        db.migrate("outbox").await;
        db
    }

    /// Runs `outboxd`'s migration for `table` in this database.
    pub async fn migrate(&self, table: &str) {
        let text = format!(
            "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"t\"\ndatabase_url = \"{}\"\ntable = \"{table}\"\n",
            self.url
        );
        let config = outboxd::config::Config::from_toml(&text, &|_| None).expect("test config");
        outboxd::migrate::run(&config, false, std::time::Duration::ZERO)
            .await
            .expect("migrate");
    }

    /// A second connection (for producer transactions that must not share one).
    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// Inserts `n` rows `seq` 0..n with `{"seq": i, "pad": "..."}` payloads
    /// of about `pad` bytes, in one transaction; returns their dedup keys in order.
    pub async fn insert_rows(&self, n: usize, pad: usize) -> Vec<String> {
        let rows = self
            .client
            .query(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT 'order', 'o-' || g, 'OrderCreated', \
                        jsonb_build_object('seq', g, 'pad', repeat('x', $2::int)) \
                 FROM generate_series(0, $1::int - 1) g ORDER BY g RETURNING dedup_key",
                &[&(n as i32), &(pad as i32)],
            )
            .await
            .expect("insert rows");
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Inserts one row, of an aggregate of its own, with the given SQL
    /// values for the override columns.
    pub async fn insert_one(&self, event_type: &str, extra_cols: &str, extra_vals: &str) -> i64 {
        let sep = if extra_cols.is_empty() { "" } else { ", " };
        let n = self
            .next_aggregate
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sql = format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload{sep}{extra_cols}) \
             VALUES ('order', 'o-{n}', '{event_type}', '{{\"k\": \"v\"}}'{sep}{extra_vals}) RETURNING id"
        );
        self.client
            .query_one(&sql, &[])
            .await
            .expect("insert one")
            .get(0)
    }

    pub async fn count(&self) -> i64 {
        self.client
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .expect("count")
            .get(0)
    }

    /// Rows in the dead-letter table (`outbox_dead`).
    pub async fn dead_count(&self) -> i64 {
        self.client
            .query_one("SELECT count(*) FROM outbox_dead", &[])
            .await
            .expect("count dead letters")
            .get(0)
    }

    /// (attempts, last_error, published_at IS NOT NULL) of row `id`, or None if gone.
    pub async fn row_state(&self, id: i64) -> Option<(i32, Option<String>, bool)> {
        self.client
            .query_opt(
                "SELECT attempts, last_error, published_at IS NOT NULL FROM outbox WHERE id = $1",
                &[&id],
            )
            .await
            .expect("row state")
            .map(|r| (r.get(0), r.get(1), r.get(2)))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot be async; a short-lived thread with its own runtime does it.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok((client, conn)) =
                        tokio_postgres::connect(&format!("{PG_URL}/postgres"), NoTls).await
                    {
                        tokio::spawn(conn);
                        // A database with a replication slot cannot be
                        // dropped (FORCE does not drop slots): end the
                        // slots' sessions and drop them first.
                        let _ = client
                            .execute(
                                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                                 WHERE database = $1 AND active_pid IS NOT NULL",
                                &[&name],
                            )
                            .await;
                        for _ in 0..50 {
                            let dropped = client
                                .execute(
                                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                                     WHERE database = $1 AND NOT active",
                                    &[&name],
                                )
                                .await;
                            let left = client
                                .query_one(
                                    "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                                    &[&name],
                                )
                                .await
                                .map(|r| r.get::<_, i64>(0))
                                .unwrap_or(0);
                            if dropped.is_ok() && left == 0 {
                                break;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        let _ = client
                            .batch_execute(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

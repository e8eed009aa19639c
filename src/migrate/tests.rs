use super::*;

fn source(table: &str, channel: Option<&str>) -> SourceConfig {
    let mut text = format!(
        "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"s\"\ndatabase_url = \"postgres://u@h/db\"\ntable = \"{table}\"\n"
    );
    if let Some(c) = channel {
        text.push_str(&format!("notify_channel = \"{c}\"\n"));
    }
    let config = Config::from_toml(&text, &|_| None).unwrap();
    config.sources.into_iter().next().unwrap()
}

#[test]
fn concurrently_builds_each_index_of_the_table_and_adds_columns_first() {
    let (columns, indexes) = concurrent_steps(&source("app.events", None));
    // Not the wake-up table's column: that table may not exist yet.
    assert_eq!(columns.len(), 1, "{columns:?}");
    assert!(
        columns[0].starts_with("ALTER TABLE \"app\".\"events\" ADD COLUMN IF NOT EXISTS held"),
        "{columns:?}"
    );
    let names: Vec<&str> = indexes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "\"app\".\"events_claim_part_idx\"",
            "\"app\".\"events_aggregate_idx\"",
            "\"app\".\"events_held_idx\"",
            "\"app\".\"events_waiting_idx\"",
            "\"app\".\"events_partition_idx\"",
            "\"app\".\"events_published_idx\"",
        ],
        "every index on the outbox table, none on the dead-letter table"
    );
    for (name, statement) in &indexes {
        let bare = name.split('.').nth(1).unwrap_or_default();
        assert!(
            statement.starts_with(&format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {bare}"))
                && statement.contains("ON \"app\".\"events\" ")
                && !statement.contains(';'),
            "{statement}"
        );
    }
}

#[test]
fn the_wal_script_splits_at_the_slot_and_fills_its_names() {
    let text = "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"Orders\"\n\
                database_url = \"postgres://u@h/db\"\ncapture = \"wal\"\n";
    let config = Config::from_toml(text, &|_| None).unwrap();
    let source = &config.sources[0];
    let wal = source.capture.wal().expect("a wal source");
    let (body, slot) = render_wal(source, wal);
    assert!(!body.contains(":'") && !slot.contains(":'"), "{body}{slot}");
    assert!(body.contains("'outboxd_orders'"), "{body}");
    assert!(
        !body.contains("pg_create_logical_replication_slot"),
        "{body}"
    );
    assert!(
        slot.contains("pg_create_logical_replication_slot('outboxd_orders', 'pgoutput')"),
        "{slot}"
    );
}

#[test]
fn fills_every_placeholder() {
    let sql = render(&source("billing.events", None));
    assert!(!sql.contains(":\""), "{sql}");
    assert!(!sql.contains(":'"), "{sql}");
    assert!(!sql.contains("\\if"), "{sql}");
    assert!(
        sql.contains(r#"CREATE TABLE IF NOT EXISTS "billing"."events" ("#),
        "{sql}"
    );
    assert!(
        sql.contains(r#"CREATE INDEX IF NOT EXISTS "events_claim_part_idx""#),
        "{sql}"
    );
    // the indexes of earlier versions go
    assert!(
        sql.contains(r#"DROP INDEX IF EXISTS "billing"."events_claim_idx""#),
        "{sql}"
    );
    assert!(
        sql.contains(r#"DROP INDEX IF EXISTS "billing"."events_pending_idx""#),
        "{sql}"
    );
    assert!(
        sql.contains("set_config('outboxd.notify_function', 'events_notify_fn', false)"),
        "{sql}"
    );
    assert!(
        sql.contains("set_config('outboxd.channel', 'outboxd.billing.events', false)"),
        "{sql}"
    );
    assert!(
        sql.contains(r#"CREATE TABLE IF NOT EXISTS "billing"."events_wakeup""#),
        "{sql}"
    );
    // `::text` casts are not mistaken for placeholders
    assert!(sql.contains("gen_random_uuid()::text"), "{sql}");
}

#[test]
fn quotes_the_channel_as_a_literal() {
    let sql = render(&source("outbox", Some("it's")));
    assert!(
        sql.contains("set_config('outboxd.channel', 'it''s', false)"),
        "{sql}"
    );
}

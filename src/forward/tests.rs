//! The mapping against a table's columns: which types fit which key, how
//! the payload and header columns are read, and problems named by key.

use super::*;
use crate::config::Config;

fn map(columns: &str) -> ColumnMap {
    let text = format!(
        "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\n[[source]]\nname = \"s\"\n\
         database_url = \"postgres://u@h/db\"\ntable = \"outboxevent\"\nlayout = \"debezium\"\n\
         [source.columns]\n{columns}\n"
    );
    let config = Config::from_toml(&text, &|_| None).expect("valid test config");
    config.sources[0].mapping.clone().expect("mapped")
}

fn col(name: &str, type_name: &str, base: &str, category: char) -> Column {
    Column {
        name: name.into(),
        type_name: type_name.into(),
        base: base.into(),
        category,
    }
}

/// Debezium's documented table, with `payload` of the given type.
fn debezium_table(payload: (&str, &str, char)) -> Vec<Column> {
    vec![
        col("id", "uuid", "uuid", 'U'),
        col("aggregatetype", "character varying(255)", "varchar", 'S'),
        col("aggregateid", "character varying(255)", "varchar", 'S'),
        col("type", "character varying(255)", "varchar", 'S'),
        col("payload", payload.0, payload.1, payload.2),
        col("tenant", "text", "text", 'S'),
        col("prio", "integer", "int4", 'N'),
        col("urgent", "boolean", "bool", 'B'),
        col("tags", "text[]", "_text", 'A'),
        col("meta", "jsonb", "jsonb", 'U'),
        col("at", "timestamp with time zone", "timestamptz", 'D'),
        col("blob", "bytea", "bytea", 'U'),
    ]
}

#[test]
fn the_payload_s_type_chooses_how_it_is_read() {
    let cases = [
        // jsonb as it is
        (("jsonb", "jsonb", 'U'), PayloadKind::Json),
        // json through text: its cast can fail
        (("json", "json", 'U'), PayloadKind::Text),
        (("text", "text", 'S'), PayloadKind::Text),
        (
            ("character varying(255)", "varchar", 'S'),
            PayloadKind::Text,
        ),
    ];
    for (payload, want) in cases {
        let plan = plan(&map(""), Some(&debezium_table(payload))).expect("fits");
        assert_eq!(plan.payload, want, "{payload:?}");
    }
}

#[test]
fn header_columns_keep_numbers_and_booleans() {
    let plan = plan(
        &map("header_columns = [\"tenant\", \"prio\", \"urgent\", \"at\", \"id\"]"),
        Some(&debezium_table(("jsonb", "jsonb", 'U'))),
    )
    .expect("fits");
    assert_eq!(
        plan.header_columns,
        vec![
            ("tenant".to_owned(), HeaderKind::Text),
            ("prio".to_owned(), HeaderKind::Scalar),
            ("urgent".to_owned(), HeaderKind::Scalar),
            ("at".to_owned(), HeaderKind::Text),
            ("id".to_owned(), HeaderKind::Text),
        ]
    );
}

#[test]
fn each_misfit_names_its_key_and_column() {
    let cases: [(&str, &[&str]); 8] = [
        // a column that is not there
        (
            "payload = \"body\"",
            &[
                "columns.payload = \"body\"",
                "public.outboxevent has no such column",
            ],
        ),
        // a payload that is not JSON or text
        (
            "payload = \"blob\"",
            &[
                "columns.payload = \"blob\" is bytea",
                "jsonb, json, text or varchar",
            ],
        ),
        // an aggregate id that is an array
        (
            "aggregate_id = \"tags\"",
            &[
                "columns.aggregate_id = \"tags\" is text[]",
                "uuid, an integer",
            ],
        ),
        // headers must be JSON
        (
            "headers = \"tenant\"",
            &["columns.headers = \"tenant\" is text"],
        ),
        // created_at must be a time
        (
            "created_at = \"prio\"",
            &["columns.created_at = \"prio\" is integer"],
        ),
        // a header column that is an array
        (
            "header_columns = [\"tenant\", \"tags\"]",
            &["columns.header_columns[1] = \"tags\" is text[]"],
        ),
        // a header column that is JSON (could be an object)
        (
            "header_columns = [\"meta\"]",
            &["columns.header_columns[0] = \"meta\" is jsonb"],
        ),
        // a missing header column
        (
            "header_columns = [\"nope\"]",
            &["columns.header_columns[0] = \"nope\"", "no such column"],
        ),
    ];
    let table = debezium_table(("jsonb", "jsonb", 'U'));
    for (columns, needles) in cases {
        let problems = plan(&map(columns), Some(&table)).expect_err(columns);
        let text = describe(&problems);
        for needle in needles {
            assert!(text.contains(needle), "{columns}: {needle:?} not in {text}");
        }
    }
}

#[test]
fn a_missing_table_is_one_problem() {
    let problems = plan(&map(""), None).expect_err("no table");
    assert_eq!(
        problems,
        vec![MappingProblem::NoTable {
            table: "public.outboxevent".into()
        }]
    );
}

#[test]
fn the_trigger_reads_every_mapped_column_quoted_and_writes_the_relay_s_table() {
    let m = map(
        "dedup_key = \"tenant\"\ncreated_at = \"at\"\nheaders = \"meta\"\nheader_columns = [\"prio\"]",
    );
    let p = plan(&m, Some(&debezium_table(("text", "text", 'S')))).expect("fits");
    let relay = m.relay_table();
    let body = trigger::body(&relay, &m, &p);
    for needle in [
        r#"INSERT INTO "public"."outboxevent_outboxd""#,
        r#"COALESCE(NEW."aggregatetype"::text, '')"#,
        r#"COALESCE(NEW."tenant"::text, NEW."id"::text, pg_catalog.gen_random_uuid()::text)"#,
        r#"COALESCE(NEW."at"::timestamptz, pg_catalog.now())"#,
        r#"COALESCE(NEW."meta"::jsonb, '{}'::jsonb) || pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object('prio', pg_catalog.to_jsonb(NEW."prio")))"#,
        "EXCEPTION WHEN invalid_text_representation",
        "COALESCE(body, 'null'::jsonb)",
    ] {
        assert!(body.contains(needle), "{needle} not in {body}");
    }
    let sql = trigger::render(&relay, &m, &p);
    assert!(sql.contains("SECURITY DEFINER"), "{sql}");
    assert!(
        sql.contains(
            r#"CREATE TRIGGER "outboxevent_outboxd_forward" AFTER INSERT ON "public"."outboxevent""#
        ),
        "{sql}"
    );
}

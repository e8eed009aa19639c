//! `layout` and `[source.columns]`: Debezium's names filled in, keys
//! overridden one by one, and every mistake named with its key and source.

use super::*;
use crate::config::{ColumnMap, DEBEZIUM_COLUMNS};
use crate::ident::TableName;

/// `MINIMAL` with `lines` appended to its (last) `[[source]]`, so that a
/// `[source.columns]` table can follow the source's own keys.
fn mapped(lines: &str) -> String {
    format!("{MINIMAL}{lines}\n")
}

fn map_of(text: &str) -> ColumnMap {
    let config = load(text).unwrap_or_else(|e| panic!("valid: {e}\n{text}"));
    config.sources[0].mapping.clone().expect("a mapped source")
}

#[test]
fn outboxd_s_own_table_is_not_mapped() {
    for text in [MINIMAL.to_owned(), mapped("layout = \"outboxd\"")] {
        let source = &load(&text).expect("valid").sources[0];
        assert!(source.mapping.is_none());
        assert_eq!(source.table.to_string(), "public.outbox");
    }
}

#[test]
fn debezium_layout_fills_debezium_s_names_and_the_relay_gets_a_table_beside() {
    let text = mapped("table = \"inventory.outboxevent\"\nlayout = \"debezium\"");
    let source = &load(&text).expect("valid").sources[0];
    let map = source.mapping.clone().expect("mapped");
    assert_eq!(
        map.table,
        TableName::parse("inventory.outboxevent").unwrap()
    );
    let keyed: Vec<(&str, &str)> = map.keyed();
    assert_eq!(keyed, DEBEZIUM_COLUMNS.to_vec());
    assert!(map.header_columns.is_empty());
    // the relay reads its own table, and its channel follows that table
    assert_eq!(source.table.to_string(), "inventory.outboxevent_outboxd");
    assert_eq!(
        source.notify_channel,
        "outboxd.inventory.outboxevent_outboxd"
    );
}

#[test]
fn keys_override_the_layout_one_by_one() {
    let cases: [(&str, &str, &str); 6] = [
        // a Debezium table whose id column was renamed
        ("id = \"event_id\"", "id", "event_id"),
        // route.by.field pointed elsewhere
        ("aggregate_type = \"topic\"", "aggregate_type", "topic"),
        // a payload column of another name
        ("payload = \"body\"", "payload", "body"),
        // the optional ones appear only when set
        ("dedup_key = \"idem\"", "dedup_key", "idem"),
        ("headers = \"meta\"", "headers", "meta"),
        ("created_at = \"timestamp\"", "created_at", "timestamp"),
    ];
    for (line, key, column) in cases {
        let map = map_of(&mapped(&format!(
            "layout = \"debezium\"\n[source.columns]\n{line}"
        )));
        let keyed = map.keyed();
        assert!(keyed.contains(&(key, column)), "{line}: {keyed:?}");
        // the other required keys keep Debezium's names
        assert!(keyed.contains(&("event_type", "type")) || key == "event_type");
    }
}

#[test]
fn columns_without_a_layout_name_every_required_column() {
    let map = map_of(&mapped(
        "table = \"events\"\n[source.columns]\nid = \"uid\"\naggregate_type = \"kind\"\n\
         aggregate_id = \"key\"\nevent_type = \"name\"\npayload = \"data\"\n\
         header_columns = [\"tenant\", \"trace_id\"]",
    ));
    assert_eq!(
        map.keyed(),
        vec![
            ("id", "uid"),
            ("aggregate_type", "kind"),
            ("aggregate_id", "key"),
            ("event_type", "name"),
            ("payload", "data"),
        ]
    );
    assert_eq!(map.header_columns, ["tenant", "trace_id"]);
}

#[test]
fn columns_take_interpolated_values() {
    let text = mapped("layout = \"debezium\"\n[source.columns]\npayload = \"${COL}\"");
    let config =
        Config::from_toml(&text, &|v| (v == "COL").then(|| "body".to_owned())).expect("valid");
    let map = config.sources[0].mapping.clone().expect("mapped");
    assert_eq!(map.payload, "body");
}

#[test]
fn each_mapping_mistake_names_its_key_and_source() {
    let cases: [(&str, &str, &[&str]); 9] = [
        // a layout we do not know
        (
            "unknown layout",
            "layout = \"sequin\"",
            &[
                "source[0].layout",
                "(source \"orders\")",
                "\"outboxd\" or \"debezium\"",
                "\"sequin\"",
            ],
        ),
        // a typo in [source.columns] is an unknown key
        (
            "unknown key",
            "layout = \"debezium\"\n[source.columns]\naggregatetype = \"x\"",
            &["aggregatetype"],
        ),
        // columns with outboxd's own layout
        (
            "columns with layout outboxd",
            "layout = \"outboxd\"\n[source.columns]\nid = \"x\"",
            &[
                "source[0].columns",
                "does not apply with layout = \"outboxd\"",
            ],
        ),
        // without a layout, a required column must be named
        (
            "missing required column",
            "[source.columns]\nid = \"id\"\naggregate_type = \"t\"\naggregate_id = \"a\"\nevent_type = \"e\"",
            &[
                "source[0].columns.payload (source \"orders\")",
                "missing",
                "layout = \"debezium\"",
            ],
        ),
        // an injection attempt in a column name
        (
            "bad identifier",
            "layout = \"debezium\"\n[source.columns]\npayload = \"payload\\\"; DROP TABLE x; --\"",
            &[
                "source[0].columns.payload",
                "may only contain ASCII letters",
            ],
        ),
        // an empty column name
        (
            "empty column",
            "layout = \"debezium\"\n[source.columns]\nheaders = \"\"",
            &["source[0].columns.headers", "name is empty"],
        ),
        // a bad header column is named by its index
        (
            "bad header column",
            "layout = \"debezium\"\n[source.columns]\nheader_columns = [\"ok\", \"not ok\"]",
            &["source[0].columns.header_columns[1]", "\"not ok\""],
        ),
        // the same header column twice
        (
            "duplicate header column",
            "layout = \"debezium\"\n[source.columns]\nheader_columns = [\"t\", \"t\"]",
            &["source[0].columns.header_columns[1]", "listed twice"],
        ),
        // header_columns must be a list of strings
        (
            "header columns not a list",
            "layout = \"debezium\"\n[source.columns]\nheader_columns = \"tenant\"",
            &["header_columns"],
        ),
    ];
    for (what, lines, needles) in cases {
        let message = err(&mapped(lines));
        for needle in needles {
            assert!(
                message.contains(needle),
                "{what}: {needle:?} not in: {message}"
            );
        }
    }
}

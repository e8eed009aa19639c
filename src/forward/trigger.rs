//! The forwarding trigger's SQL: an `AFTER INSERT … FOR EACH ROW` trigger
//! on the producers' table whose function inserts the mapped values into
//! the relay's table.
//!
//! What the function promises producers: it never fails their insert over
//! a value. A NULL in a mapped text column becomes `''`, a NULL payload
//! JSON `null`, text that is not JSON a JSON string; what the relay cannot
//! send (a 300-byte event type, say) becomes a bad row it parks, visible
//! and replayable, as for any row. It runs as its owner (the role that ran
//! `migrate`, SECURITY DEFINER), so producers need no right on the relay's
//! table; with a fixed `search_path` and every name qualified, nothing a
//! producer's session sets can change what it does.

use crate::config::ColumnMap;
use crate::ident::{TableName, quote_ident, quote_literal};

use super::{HeaderKind, PayloadKind, Plan};

/// The trigger on the producers' table.
pub fn trigger_name(map: &ColumnMap) -> String {
    map.table.derived("_outboxd_forward")
}

/// Its function, in the producers' table's schema.
pub fn function_name(map: &ColumnMap) -> String {
    map.table.derived("_outboxd_forward_fn")
}

/// The function's body, exactly as `pg_proc.prosrc` keeps it (`check`
/// compares the two to tell a trigger made for another mapping).
pub fn body(relay: &TableName, map: &ColumnMap, plan: &Plan) -> String {
    let new = |column: &str| format!("NEW.{}", quote_ident(column));
    let text = |column: &str| format!("COALESCE({}::text, '')", new(column));
    let payload = match plan.payload {
        PayloadKind::Json => format!("    body := {}::jsonb;\n", new(&map.payload)),
        // A subtransaction per row, but one that writes nothing, so it
        // takes no transaction id (no subtransaction cache overflow).
        PayloadKind::Text => format!(
            "    BEGIN\n        body := {p}::jsonb;\n    \
             EXCEPTION WHEN invalid_text_representation OR untranslatable_character THEN\n        \
             body := pg_catalog.to_jsonb({p}::text);\n    END;\n",
            p = new(&map.payload)
        ),
    };
    let mut pairs = Vec::new();
    for (column, kind) in &plan.header_columns {
        let value = match kind {
            HeaderKind::Scalar => format!("pg_catalog.to_jsonb({})", new(column)),
            HeaderKind::Text => format!("{}::text", new(column)),
        };
        pairs.push(format!("{}, {value}", quote_literal(column)));
    }
    let from_columns = if pairs.is_empty() {
        "'{}'::jsonb".to_owned()
    } else {
        // A NULL column sends no header.
        format!(
            "pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object({}))",
            pairs.join(", ")
        )
    };
    // The header columns win over the same names in the headers column.
    let headers = match &map.headers {
        Some(h) => format!(
            "COALESCE({}::jsonb, '{{}}'::jsonb) || {from_columns}",
            new(h)
        ),
        None => from_columns,
    };
    let dedup_key = match &map.dedup_key {
        Some(d) => format!(
            "COALESCE({}::text, {}::text, pg_catalog.gen_random_uuid()::text)",
            new(d),
            new(&map.id)
        ),
        None => format!(
            "COALESCE({}::text, pg_catalog.gen_random_uuid()::text)",
            new(&map.id)
        ),
    };
    let (created_col, created_val) = match &map.created_at {
        Some(c) => (
            ", created_at",
            format!(
                ",\n        COALESCE({}::timestamptz, pg_catalog.now())",
                new(c)
            ),
        ),
        None => ("", String::new()),
    };
    format!(
        "\nDECLARE\n    body jsonb;\nBEGIN\n{payload}    \
         INSERT INTO {relay} (aggregate_type, aggregate_id, event_type, payload, headers, dedup_key{created_col})\n    \
         VALUES (\n        {at},\n        {ai},\n        {et},\n        \
         COALESCE(body, 'null'::jsonb),\n        {headers},\n        {dedup_key}{created_val});\n    \
         RETURN NULL;\nEND\n",
        relay = relay.quoted(),
        at = text(&map.aggregate_type),
        ai = text(&map.aggregate_id),
        et = text(&map.event_type),
    )
}

/// The function and the trigger; `migrate` runs it after `sql/outbox.sql`
/// made the relay's table, in the same transaction. Idempotent: the
/// function is replaced (a changed mapping takes effect at once) and the
/// trigger made again.
pub fn render(relay: &TableName, map: &ColumnMap, plan: &Plan) -> String {
    let schema = quote_ident(&map.table.schema);
    let function = format!("{schema}.{}", quote_ident(&function_name(map)));
    let trigger = quote_ident(&trigger_name(map));
    let table = map.table.quoted();
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n    \
         LANGUAGE plpgsql SECURITY DEFINER\n    \
         SET search_path = pg_catalog, pg_temp\n    \
         AS $outboxd_forward${body}$outboxd_forward$;\n\
         DROP TRIGGER IF EXISTS {trigger} ON {table};\n\
         CREATE TRIGGER {trigger} AFTER INSERT ON {table}\n    \
         FOR EACH ROW EXECUTE FUNCTION {function}();\n",
        body = body(relay, map, plan),
    )
}

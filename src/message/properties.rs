//! Property tests: any row maps to a message or is a bad row, never a panic.

use super::*;
use proptest::prelude::*;
use serde_json::{Map, Number};

/// Arbitrary JSON: unicode strings, nulls, numbers, nesting.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        "\\PC{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::hash_map("\\PC{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    /// Any row either becomes a message whose body is the payload's
    /// JSON value and whose message_id is the dedup key, or is a bad row
    /// with a reason. Never a panic (ShortString would panic on From).
    #[test]
    fn any_row_maps_or_is_a_bad_row(
        payload in json(),
        headers in json(),
        aggregate_type in "\\PC{0,300}",
        aggregate_id in "\\PC{0,300}",
        event_type in "\\PC{0,300}",
        dedup_key in "\\PC{0,300}",
        exchange in proptest::option::of("\\PC{0,300}"),
    ) {
        // PostgreSQL prints jsonb with ", " and ": "; serde's pretty form is close enough.
        let text = serde_json::to_string_pretty(&payload).unwrap();
        let row = OutboxRow {
            id: 1,
            aggregate_type,
            aggregate_id,
            event_type,
            payload: text,
            headers: headers.to_string(),
            dedup_key: dedup_key.clone(),
            exchange,
            routing_key: None,
            created_at: UNIX_EPOCH,
            attempts: 0,
            undecodable: None,
        };
        let t = Template::parse("{aggregate_type}.{event_type}").unwrap();
        let routing = Routing { source: "s", exchange: "e", routing_key: &t, max_body: usize::MAX, format: &MessageFormat::Plain };
        match row.to_outbound(&routing) {
            Ok(m) => {
                // Byte-exact: the body is the compact form of the same
                // text. (Comparing parsed Values would trip over serde's
                // inexact float parsing, not over anything of ours.)
                let want = serde_json::to_string(&payload).unwrap();
                prop_assert_eq!(String::from_utf8_lossy(&m.body), want.as_str());
                prop_assert_eq!(m.properties.message_id().as_ref().unwrap().as_str(), dedup_key.as_str());
            }
            Err(bad) => prop_assert!(!bad.to_string().is_empty()),
        }
    }
}

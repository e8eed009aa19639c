//! Random keys and values in the loader: no panic, and every problem
//! located by a key path or a line.

use super::*;
use proptest::prelude::*;

/// Keys and values a config can hold, assembled into TOML at random.
fn source_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "name",
        "database_url",
        "database_url_file",
        "table",
        "exchange",
        "routing_key",
        "batch_size",
        "poll_interval",
        "after_publish",
        "retention",
        "max_in_flight",
        "pool_size",
        "retry_initial",
        "retry_max",
        "max_attempts",
        "max_message_bytes",
        "notify_channel",
        "bogus",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "\\PC{0,40}".prop_map(|s| format!("{s:?}")),
        Just("\"${NOPE}\"".to_owned()),
        Just("true".to_owned()),
        Just("[1, 2]".to_owned()),
    ];
    (key, value).prop_map(|(k, v)| format!("{k} = {v}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    /// No text, however broken, makes the loader panic.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        let _ = load(&text);
    }

    /// Random keys and values in an otherwise valid config: either it
    /// loads, or every problem is reported with a key path or a line.
    #[test]
    fn random_source_keys_load_or_name_the_problem(lines in prop::collection::vec(source_line(), 0..8)) {
        let mut text = MINIMAL.to_owned();
        let mut seen = std::collections::HashSet::new();
        for line in lines {
            let key = line.split(" = ").next().unwrap_or_default().to_owned();
            if seen.insert(key) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        if let Err(e) = load(&text) {
            let msg = e.to_string();
            prop_assert!(
                msg.contains("source[0]") || msg.contains("line") || msg.contains("rabbitmq"),
                "error without a location: {}", msg
            );
        }
    }
}

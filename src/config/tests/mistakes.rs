//! Mistakes: each one named with its key (and source), several at once,
//! and values that parse but cannot work.

use super::*;

#[test]
fn each_mistake_is_reported_with_its_key() {
    let cases: [(&str, String, &[&str]); 18] = [
        // an ordering we do not have
        (
            "ordering",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nordering = \"strict\"",
            ),
            &[
                "source[0].ordering",
                "\"orders\"",
                "\"aggregate\", \"aggregate_strict\" or \"none\"",
            ],
        ),
        // on_park means nothing without ordering
        (
            "on_park without ordering",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nordering = \"none\"\non_park = \"hold\"",
            ),
            &["source[0].on_park", "only applies with ordering"],
        ),
        // TOML syntax error: line number
        ("syntax", "[rabbitmq\nurl = 1".to_owned(), &["line 1"]),
        // unknown key in a source: the key is named
        (
            "unknown key",
            MINIMAL.replace("name = \"orders\"", "name = \"orders\"\nbatchsize = 5"),
            &["batchsize"],
        ),
        // wrong type
        (
            "wrong type",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nbatch_size = \"many\"",
            ),
            &["batch_size"],
        ),
        // missing variable: key, source and variable named
        (
            "missing var",
            MINIMAL.replace("root@", "${DB_USER}@"),
            &["source[0].database_url", "\"orders\"", "DB_USER"],
        ),
        // duplicate source names
        (
            "duplicate",
            format!(
                "{MINIMAL}\n[[source]]\nname = \"orders\"\ndatabase_url = \"postgres://root@h/x\"\n"
            ),
            &["source[1].name", "duplicate"],
        ),
        // bad database URL, and the URL itself (with its password) is not echoed
        (
            "bad pg url",
            MINIMAL.replace(
                "postgres://root@127.0.0.1:5432/orders",
                "postgres://root:hunter2@127.0.0.1:notaport/orders",
            ),
            &["source[0].database_url (source \"orders\")"],
        ),
        // bad AMQP URL
        (
            "bad amqp url",
            MINIMAL.replace("amqp://guest", "http://guest"),
            &["rabbitmq.url"],
        ),
        // unknown template placeholder
        (
            "bad template",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nrouting_key = \"{aggregate}.x\"",
            ),
            &["source[0].routing_key", "{aggregate}", "{aggregate_type}"],
        ),
        // hostile table name
        (
            "table injection",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\ntable = 'outbox\"; DROP TABLE x; --'",
            ),
            &["source[0].table", "may only contain"],
        ),
        // bad enum value
        (
            "after_publish",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nafter_publish = \"drop\"",
            ),
            &["source[0].after_publish", "\"delete\" or \"mark\""],
        ),
        // bad duration
        (
            "duration",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\npoll_interval = \"soon\"",
            ),
            &["source[0].poll_interval", "soon"],
        ),
        // out-of-range number
        (
            "batch size",
            MINIMAL.replace("name = \"orders\"", "name = \"orders\"\nbatch_size = 0"),
            &["source[0].batch_size", "between 1 and 10000"],
        ),
        // an sslmode libpq does not have
        (
            "sslmode",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nsslmode = \"verify-ca\"",
            ),
            &["source[0].sslmode", "verify-full"],
        ),
        // a CA file without verification
        (
            "sslrootcert without verify-full",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nsslmode = \"require\"\nsslrootcert = \"/x\"",
            ),
            &["source[0].sslrootcert", "verify-full"],
        ),
        // a CA file that is not there
        (
            "sslrootcert missing",
            MINIMAL.replace(
                "name = \"orders\"",
                "name = \"orders\"\nsslmode = \"verify-full\"\nsslrootcert = \"/nonexistent.pem\"",
            ),
            &["source[0].sslrootcert", "/nonexistent.pem"],
        ),
        // no sources at all
        (
            "no sources",
            "[rabbitmq]\nurl = \"amqp://h\"\n".to_owned(),
            &["no [[source]]"],
        ),
    ];
    for (what, text, needles) in cases {
        let msg = err(&text);
        for needle in needles {
            assert!(msg.contains(needle), "{what}: {needle:?} not in {msg:?}");
        }
        assert!(
            !msg.contains("hunter2"),
            "{what}: password leaked in {msg:?}"
        );
    }
}

#[test]
fn several_problems_are_reported_together() {
    let text = MINIMAL.replace(
        "name = \"orders\"",
        "name = \"orders\"\nbatch_size = -1\nexchange = \"bad exchange\"",
    );
    let msg = err(&text);
    assert!(msg.contains("2 problems"), "{msg}");
    assert!(
        msg.contains("batch_size") && msg.contains("exchange"),
        "{msg}"
    );
}

#[test]
fn values_that_cannot_work_are_rejected_with_the_key_and_a_reason() {
    let long_literal = "x".repeat(300);
    let cases: Vec<(&str, String, &[&str])> = vec![
        // u64::MAX seconds: parsed fine, then `poll_interval * 3` panicked
        (
            "endless poll",
            with_source_line("poll_interval = \"18446744073709551615s\""),
            &["source[0].poll_interval", "between 10ms and 1h"],
        ),
        // below the floor
        (
            "tiny poll",
            with_source_line("poll_interval = \"1ms\""),
            &["source[0].poll_interval", "between 10ms and 1h"],
        ),
        // 1 ns timed out every confirm: 373 duplicates of 500 rows
        (
            "nanosecond confirm",
            with_rabbit_line("confirm_timeout = \"1ns\""),
            &["rabbitmq.confirm_timeout", "between 1s and 1h", "\"1ns\""],
        ),
        // a drain longer than any orchestrator waits
        (
            "drain",
            format!("[shutdown]\ndrain_timeout = \"1000h\"\n{MINIMAL}"),
            &["shutdown.drain_timeout", "between 0s and 1h"],
        ),
        // a count(*) per source every millisecond
        (
            "backlog",
            format!("[metrics]\nbacklog_interval = \"1ms\"\n{MINIMAL}"),
            &["metrics.backlog_interval", "between 100ms and 1h"],
        ),
        // a retry delay that pushes available_at out of PostgreSQL's range
        (
            "retry max",
            with_source_line("retry_max = \"400000000000s\""),
            &["source[0].retry_max", "between 1ms and 1day"],
        ),
        // beyond what `now() - interval` can compute
        (
            "retention",
            with_source_line("after_publish = \"mark\"\nretention = \"200years\""),
            &["source[0].retention", "100years"],
        ),
        // a constant routing key no broker accepts: every row parked
        (
            "long constant routing key",
            with_source_line(&format!("routing_key = \"{long_literal}\"")),
            &["source[0].routing_key", "is 300 bytes", "at most 255"],
        ),
        // the fixed part alone is too long, whatever the placeholder holds
        (
            "long literal part",
            with_source_line(&format!("routing_key = \"{{event_type}}.{long_literal}\"")),
            &["source[0].routing_key", "fixed text of 301 bytes"],
        ),
        // the broker resets a connection with a huge client property
        (
            "connection name",
            with_rabbit_line(&format!("connection_name = \"{long_literal}\"")),
            &["rabbitmq.connection_name", "300 bytes", "at most 255"],
        ),
        // an empty URL used to be "names no host"
        (
            "empty url",
            MINIMAL.replace("postgres://root@127.0.0.1:5432/orders", ""),
            &["source[0].database_url", "is empty"],
        ),
        // a variable in a default used to leave `${V}` behind
        (
            "nested default",
            MINIMAL.replace("postgres://root@127.0.0.1:5432/orders", "${U:-${V}}"),
            &["source[0].database_url", "nested `${`"],
        ),
        // a parameter tokio-postgres does not know: named
        (
            "unknown parameter",
            MINIMAL.replace("/orders\"", "/orders?foo=1\""),
            &[
                "source[0].database_url",
                "unknown connection string parameter `foo`",
            ],
        ),
        // a port that is not a number: tokio-postgres' own cause
        (
            "bad port",
            MINIMAL.replace(
                "postgres://root@127.0.0.1:5432/orders",
                "host=127.0.0.1 port=5x",
            ),
            &["source[0].database_url", "invalid value for option `port`"],
        ),
        // three parts: the whole value is named
        (
            "three-part table",
            with_source_line("table = \"a.b.c\""),
            &["source[0].table", "\"a.b.c\"", "more than one `.`"],
        ),
    ];
    for (what, text, needles) in cases {
        let msg = err(&text);
        for needle in needles {
            assert!(msg.contains(needle), "{what}: {needle:?} not in {msg:?}");
        }
    }
    // the bounds themselves are accepted
    for line in [
        "poll_interval = \"10ms\"",
        "poll_interval = \"1h\"",
        "retry_max = \"1day\"",
        "after_publish = \"mark\"\nretention = \"100years\"",
        &format!("routing_key = \"{}\"", "k".repeat(255)),
    ] {
        load(&with_source_line(line)).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    load(&with_rabbit_line("confirm_timeout = \"1s\"")).unwrap();
    load(&with_rabbit_line(&format!(
        "connection_name = \"{}\"",
        "n".repeat(255)
    )))
    .unwrap();
}

/// A refusal with an error behind it (io, duration, TLS, table name,
/// template, address) keeps that error as its source, and the printed
/// chain says each thing once: the message already ends with the cause.
#[test]
fn refusals_keep_their_cause_and_print_it_once() {
    use crate::telemetry::ErrorChain;
    use std::error::Error as _;
    let cases = [
        (
            with_source_line("sslmode = \"verify-full\"\nsslrootcert = \"/nonexistent/ca.pem\""),
            "No such file",
        ),
        (
            MINIMAL.replace(
                "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
                "database_url_file = \"/nonexistent/x\"",
            ),
            "No such file",
        ),
        (
            with_source_line("poll_interval = \"3 fortnights\""),
            "unknown time unit",
        ),
        (with_source_line("table = \"1x\""), "may only contain"),
        (
            with_source_line("routing_key = \"{aggregate}\""),
            "unknown placeholder",
        ),
        (
            format!("[metrics]\nlisten = \"nope\"\n{MINIMAL}"),
            "invalid socket address",
        ),
    ];
    for (text, cause) in cases {
        let e = load(&text).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
        let kept = e
            .source()
            .and_then(|reason| reason.source())
            .map(ToString::to_string)
            .unwrap_or_else(|| panic!("no cause kept: {e}"));
        assert!(kept.contains(cause), "{cause:?} not in {kept:?}");
        assert_eq!(ErrorChain(&e).to_string(), e.to_string());
    }
    // a plain refusal has nothing behind its reason
    let e = load(&with_source_line("batch_size = 0")).unwrap_err();
    assert!(e.source().is_some_and(|reason| reason.source().is_none()));
}

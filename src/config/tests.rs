//! Config loading: every documented default, and every kind of mistake
//! producing a message that names the key (and the source).

use super::*;

const MINIMAL: &str = r#"
[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[[source]]
name = "orders"
database_url = "postgres://root@127.0.0.1:5432/orders"
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, &no_env)
}

fn err(text: &str) -> String {
    load(text).unwrap_err().to_string()
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.metrics.listen.to_string(), DEFAULT_METRICS_LISTEN);
    assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.rabbitmq.display, "127.0.0.1:5672// as guest");
    let s = &c.sources[0];
    assert_eq!(s.table.to_string(), "public.outbox");
    assert_eq!(s.exchange, "");
    assert_eq!(s.routing_key.to_string(), source::DEFAULT_ROUTING_KEY);
    assert_eq!(s.batch_size, 500);
    assert_eq!(s.poll_interval, Duration::from_secs(1));
    assert_eq!(s.after_publish, AfterPublish::Delete);
    assert_eq!(s.max_in_flight, 4);
    assert_eq!(s.ordering, Ordering::Aggregate);
    assert_eq!(s.on_park, OnPark::Hold);
    assert_eq!(s.pool_size, 5);
    assert_eq!(s.notify_channel, "outboxd.public.outbox");
    assert_eq!(s.database_display, "127.0.0.1:5432/orders as root");
}

#[test]
fn the_bundled_example_config_is_valid() {
    let text = include_str!("../../config/outboxd.toml");
    let c = load(text).unwrap();
    assert!(!c.sources.is_empty());
}

#[test]
fn variables_are_substituted_in_every_string() {
    let text = r#"
[rabbitmq]
url = "amqp://guest:${PW}@127.0.0.1:5672/%2f"
[[source]]
name = "${NAME}"
database_url = "postgres://root@127.0.0.1/orders"
poll_interval = "${POLL}"
after_publish = "${MODE}"
"#;
    let env = |v: &str| match v {
        "PW" => Some("s3cr\"et".to_owned()),
        "NAME" => Some("orders".to_owned()),
        "POLL" => Some("250ms".to_owned()),
        "MODE" => Some("mark".to_owned()),
        _ => None,
    };
    let c = Config::from_toml(text, &env).unwrap();
    assert_eq!(
        c.rabbitmq.url.expose(),
        "amqp://guest:s3cr\"et@127.0.0.1:5672/%2f"
    );
    assert_eq!(c.sources[0].name, "orders");
    assert_eq!(c.sources[0].poll_interval, Duration::from_millis(250));
    assert_eq!(c.sources[0].after_publish, AfterPublish::Mark);
}

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
                "\"aggregate\" or \"none\"",
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
fn secrets_can_come_from_files_but_not_from_both() {
    let dir = std::env::temp_dir().join(format!("outboxd-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("db_url");
    std::fs::write(&file, "postgres://root:pw@127.0.0.1/orders\n").unwrap();
    let text = MINIMAL.replace(
        "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
        &format!("database_url_file = {:?}", file.display().to_string()),
    );
    let c = load(&text).unwrap();
    // the trailing newline of the mounted file is not part of the value
    assert_eq!(
        c.sources[0].database_url.expose(),
        "postgres://root:pw@127.0.0.1/orders"
    );
    let both = text.replace(
        "name = \"orders\"",
        "name = \"orders\"\ndatabase_url = \"postgres://x@y/z\"",
    );
    assert!(err(&both).contains("not both"), "{}", err(&both));
    let missing = MINIMAL.replace(
        "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
        "database_url_file = \"/nonexistent/x\"",
    );
    assert!(
        err(&missing).contains("database_url_file"),
        "{}",
        err(&missing)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_are_not_in_debug_output() {
    let text = MINIMAL
        .replace("guest:guest", "guest:hunter2")
        .replace("root@", "root:hunter3@");
    let c = load(&text).unwrap();
    let debug = format!("{:?}", c.rabbitmq) + &format!("{:?}", c.sources[0].database_url);
    assert!(
        !debug.contains("hunter2") && !debug.contains("hunter3"),
        "{debug}"
    );
}

mod properties {
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
}

#[test]
fn sslmode_comes_from_the_key_or_else_the_url() {
    use crate::tls::PgTls;
    let tls = |extra: &str, url_suffix: &str| {
        let text = MINIMAL
            .replace("/orders\"", &format!("/orders{url_suffix}\""))
            .replace("name = \"orders\"", &format!("name = \"orders\"\n{extra}"));
        load(&text).unwrap().sources[0].tls.clone()
    };
    // the default, like libpq's prefer, connects without TLS
    assert_eq!(tls("", ""), PgTls::Off);
    // the URL's sslmode is used when the key is absent
    assert_eq!(tls("", "?sslmode=require"), PgTls::Require);
    assert_eq!(tls("", "?sslmode=disable"), PgTls::Off);
    // the key and the URL may both say it, if they agree
    assert_eq!(
        tls("sslmode = \"require\"", "?sslmode=require"),
        PgTls::Require
    );
    // and must not disagree: the key used to win silently, so a URL's
    // require could be downgraded to no TLS by a key elsewhere (issue 8)
    let both = MINIMAL
        .replace("/orders\"", "/orders?sslmode=require\"")
        .replace(
            "name = \"orders\"",
            "name = \"orders\"\nsslmode = \"disable\"",
        );
    let msg = err(&both);
    assert!(
        msg.contains("source[0].sslmode")
            && msg.contains("differs from the database_url's sslmode"),
        "{msg}"
    );
    assert_eq!(
        tls("sslmode = \"verify-full\"", ""),
        PgTls::VerifyFull { ca_file: None }
    );
    // libpq's verify-full and sslrootcert in the URL, which tokio-postgres
    // does not know, become the source's TLS settings
    assert_eq!(
        tls("", "?sslmode=verify-full"),
        PgTls::VerifyFull { ca_file: None }
    );
    let root = MINIMAL.replace(
        "/orders\"",
        "/orders?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"",
    );
    let msg = err(&root);
    // an error about a value from the URL names the URL's key
    assert!(
        msg.contains("source[0].database_url") && msg.contains("/nonexistent/ca.pem"),
        "{msg}"
    );
}

#[test]
fn amqps_urls_always_get_tls_settings_and_amqp_urls_never() {
    use crate::tls::Trust;
    let dir = std::env::temp_dir().join(format!("outboxd-amqps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A CA certificate to load (nothing connects in this test).
    let ca = dir.join("ca.pem");
    let pem = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=outboxd unit test", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(pem.status.success());
    let ca = ca.display().to_string();
    let rabbit = |url: &str, extra: &str| {
        MINIMAL.replace(
            "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            &format!("url = {url:?}\n{extra}"),
        )
    };
    let tls = |url: &str, extra: &str| load(&rabbit(url, extra)).unwrap().rabbitmq.tls;

    // amqp:// has no TLS at all
    assert_eq!(tls("amqp://g:g@h/%2f", ""), None);
    // amqps:// without a CA file trusts the system's roots
    assert_eq!(
        tls("amqps://g:g@h/%2f", "").map(|t| t.trust),
        Some(Trust::SystemRoots)
    );
    // the scheme in capitals is still amqps
    assert_eq!(
        tls("AMQPS://g:g@h/%2f", "").map(|t| t.trust),
        Some(Trust::SystemRoots)
    );
    // a CA file replaces the system's roots
    let with_ca = load(&rabbit(
        "amqps://g:g@h/%2f",
        &format!("tls_ca_file = {ca:?}"),
    ))
    .unwrap();
    assert_eq!(
        with_ca.rabbitmq.tls.as_ref().map(|t| t.trust.clone()),
        Some(Trust::CaFile(ca.clone()))
    );
    assert_eq!(
        with_ca.rabbitmq.describe(),
        format!("h:5671// as g (TLS, certificate verified against {ca})")
    );
    // verification is off only when asked for by name, and then says so
    let insecure = load(&rabbit(
        "amqps://g:g@h/%2f",
        "tls_insecure_skip_verify = true",
    ))
    .unwrap();
    assert_eq!(
        insecure.rabbitmq.tls.as_ref().map(|t| t.trust.clone()),
        Some(Trust::Anyone)
    );
    assert!(insecure.rabbitmq.describe().contains("NOT verified"));

    let mistakes: [(&str, String, &str); 5] = [
        // TLS settings on a plain URL
        (
            "ca file on amqp://",
            rabbit("amqp://g:g@h/%2f", &format!("tls_ca_file = {ca:?}")),
            "rabbitmq.tls_ca_file: TLS settings need an amqps:// url",
        ),
        // skipping verification of a connection that has no TLS
        (
            "skip verify on amqp://",
            rabbit("amqp://g:g@h/%2f", "tls_insecure_skip_verify = true"),
            "rabbitmq.tls_insecure_skip_verify: TLS settings need an amqps:// url",
        ),
        // a CA file and no verification contradict each other
        (
            "ca file and skip verify",
            rabbit(
                "amqps://g:g@h/%2f",
                &format!("tls_ca_file = {ca:?}\ntls_insecure_skip_verify = true"),
            ),
            "rabbitmq.tls_insecure_skip_verify: tls_ca_file asks for verification",
        ),
        // a client certificate without its key
        (
            "cert without key",
            rabbit("amqps://g:g@h/%2f", &format!("tls_cert_file = {ca:?}")),
            "rabbitmq.tls_key_file: missing",
        ),
        // a key file that holds no key
        (
            "key file without a key",
            rabbit(
                "amqps://g:g@h/%2f",
                &format!("tls_cert_file = {ca:?}\ntls_key_file = {ca:?}"),
            ),
            "rabbitmq.tls_cert_file:",
        ),
    ];
    for (what, text, needle) in mistakes {
        let msg = err(&text);
        assert!(msg.contains(needle), "{what}: {needle:?} not in {msg:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `MINIMAL` with `line` added to the `[[source]]`.
fn with_source_line(line: &str) -> String {
    MINIMAL.replace("name = \"orders\"", &format!("name = \"orders\"\n{line}"))
}

/// `MINIMAL` with `line` added to `[rabbitmq]`.
fn with_rabbit_line(line: &str) -> String {
    MINIMAL.replace("[rabbitmq]\n", &format!("[rabbitmq]\n{line}\n"))
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

#[test]
fn secret_files_must_hold_a_little_utf8_text() {
    let dir = std::env::temp_dir().join(format!("outboxd-secret-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let cases = [
        // empty: used to be "names no host"
        (file("empty", b""), "is empty"),
        // only the newline a mounted secret ends in
        (file("newline", b"\n"), "is empty"),
        // not text
        (
            file("binary", b"postgres://root:\xff\xfe@h/d"),
            "is not UTF-8 text",
        ),
        // a megabyte: more than any URL
        (file("huge", &vec![b'a'; 1 << 20]), "more than 64 KiB"),
        // endless: read only up to the cap, not until memory runs out
        ("/dev/zero".to_owned(), "more than 64 KiB"),
    ];
    for (path, needle) in cases {
        let text = MINIMAL.replace(
            "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
            &format!("database_url_file = {path:?}"),
        );
        let msg = err(&text);
        assert!(
            msg.contains("source[0].database_url_file") && msg.contains(needle),
            "{path}: {needle:?} not in {msg:?}"
        );
        assert!(!msg.contains("root:"), "{path}: content leaked in {msg:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Properties of the hardening checks (issue 8): durations, URLs,
/// `_file` contents and templates, at random. Whatever the input, loading
/// never panics, an error always names a key, and no error (and no
/// display string) holds a piece of a password.
mod value_properties {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Marks the password in generated URLs; never valid in a host or port.
    const MARK: &str = "Zq9";

    fn cases() -> ProptestConfig {
        ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(256),
        )
    }

    /// "<number><unit>", sometimes two of them, numbers up to u64::MAX and
    /// beyond (a string of digits), units valid or not.
    fn duration() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            (0u64..2000).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "[0-9]{15,30}",
        ];
        let unit = prop::sample::select(vec![
            "ns", "us", "ms", "s", "m", "h", "d", "w", "years", "", "x",
        ]);
        let one = (number, unit).prop_map(|(n, u)| format!("{n}{u}"));
        prop_oneof![
            one.clone(),
            (one.clone(), one).prop_map(|(a, b)| format!("{a} {b}"))
        ]
    }

    /// Where a duration can go: (TOML text, the key an error must name).
    fn with_duration(key: usize, value: &str) -> (String, &'static str) {
        let v = format!("{value:?}");
        match key {
            0 => (
                format!("[metrics]\nbacklog_interval = {v}\n{MINIMAL}"),
                "metrics.backlog_interval",
            ),
            1 => (
                format!("[shutdown]\ndrain_timeout = {v}\n{MINIMAL}"),
                "shutdown.drain_timeout",
            ),
            2 => (
                with_rabbit_line(&format!("confirm_timeout = {v}")),
                "rabbitmq.confirm_timeout",
            ),
            3 => (
                with_source_line(&format!("poll_interval = {v}")),
                "source[0].poll_interval",
            ),
            4 => (
                with_source_line(&format!("retry_initial = {v}")),
                "source[0].retry_initial",
            ),
            5 => (
                with_source_line(&format!("retry_max = {v}")),
                "source[0].retry_max",
            ),
            _ => (
                with_source_line(&format!("after_publish = \"mark\"\nretention = {v}")),
                "source[0].retention",
            ),
        }
    }

    /// Text for a user name or password: letters and the characters URLs
    /// reserve, percent signs included.
    fn userinfo_text() -> impl Strategy<Value = String> {
        "[a-z0-9@%:/?#&=' ]{0,12}"
    }

    /// A PostgreSQL connection string in either form, with `MARK` inside
    /// the password and random parameters.
    fn database_url() -> impl Strategy<Value = String> {
        let param = (
            prop::sample::select(vec![
                "sslmode",
                "sslrootcert",
                "port",
                "application_name",
                "sslcert",
                "foo",
                "connect_timeout",
                "",
            ]),
            prop::sample::select(vec![
                "require",
                "verify-full",
                "disable",
                "verify-ca",
                "5x",
                "/nonexistent/ca.pem",
                "3",
                "",
                "a%40b",
                "%zz",
            ]),
        );
        let params = prop::collection::vec(param, 0..3);
        (
            prop::sample::select(vec!["postgres://", "postgresql://", ""]),
            "[a-z]{0,5}",
            userinfo_text(),
            userinfo_text(),
            prop::sample::select(vec!["127.0.0.1", "db.example", "", "[::1]"]),
            prop::sample::select(vec!["", ":5432", ":5x", ":99999"]),
            params,
        )
            .prop_map(|(scheme, user, pw1, pw2, host, port, params)| {
                let password = format!("{pw1}{MARK}{pw2}");
                if scheme.is_empty() {
                    let mut text = format!("host={host} user={user} password={password}");
                    for (k, v) in params {
                        text.push_str(&format!(" {k}={v}"));
                    }
                    text
                } else {
                    let query: Vec<String> =
                        params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let query = if query.is_empty() {
                        String::new()
                    } else {
                        format!("?{}", query.join("&"))
                    };
                    format!("{scheme}{user}:{password}@{host}{port}/db{query}")
                }
            })
    }

    /// An AMQP URL with `MARK` inside the password.
    fn amqp_url() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["amqp://", "amqps://", "AMQPS://", "http://"]),
            userinfo_text(),
            userinfo_text(),
            prop::sample::select(vec!["127.0.0.1", "h", ""]),
            prop::sample::select(vec!["", ":5672", ":0", ":x"]),
            prop::sample::select(vec![
                "",
                "/",
                "/%2f",
                "/v@x",
                "?heartbeat=5",
                "?heartbeat=x",
            ]),
        )
            .prop_map(|(scheme, pw1, pw2, host, port, tail)| {
                format!("{scheme}guest:{pw1}{MARK}{pw2}@{host}{port}{tail}")
            })
    }

    /// A routing-key template: braces, placeholders and long literals.
    fn template() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("{event_type}".to_owned()),
            Just("{source}".to_owned()),
            Just("{".to_owned()),
            Just("}}".to_owned()),
            "[a-z.]{0,8}",
            (1usize..200).prop_map(|n| "k".repeat(n)),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
    }

    /// File contents: short text, bytes that are not UTF-8, or too many.
    fn file_content() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            database_url().prop_map(|s| format!("{s}\n").into_bytes()),
            prop::collection::vec(any::<u8>(), 0..64),
            (60_000usize..70_000).prop_map(|n| vec![b'a'; n]),
            Just(Vec::new()),
        ]
    }

    fn no_mark(text: &str) -> Result<(), TestCaseError> {
        prop_assert!(
            !text.contains(MARK),
            "a piece of the password in {:?}",
            text
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(cases())]

        /// Any duration, however large or malformed, in any duration key.
        #[test]
        fn durations_load_or_name_their_key(key in 0usize..7, value in duration()) {
            let (text, name) = with_duration(key, &value);
            if let Err(e) = load(&text) {
                let msg = e.to_string();
                prop_assert!(msg.contains(name), "{} not named in {}", name, msg);
            }
        }

        /// Database URLs with reserved characters in the password and
        /// random parameters: never a panic, an error names the source's
        /// key, and neither an error nor the display holds the password.
        #[test]
        fn database_urls_never_leak_the_password(url in database_url()) {
            let text = MINIMAL.replace(
                "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
                &format!("database_url = {url:?}"),
            );
            match load(&text) {
                Ok(c) => no_mark(&c.sources[0].database_display)?,
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("source[0]."), "no key in {}", msg);
                    no_mark(&msg)?;
                }
            }
        }

        /// The same for the broker URL.
        #[test]
        fn amqp_urls_never_leak_the_password(url in amqp_url()) {
            let text = MINIMAL.replace(
                "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
                &format!("url = {url:?}"),
            );
            match load(&text) {
                Ok(c) => {
                    no_mark(&c.rabbitmq.display)?;
                    no_mark(&c.rabbitmq.describe())?;
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("rabbitmq."), "no key in {}", msg);
                    no_mark(&msg)?;
                }
            }
        }

        /// A `_file` secret holding anything: never a panic, never its
        /// content in the error, always the key.
        #[test]
        fn secret_files_load_or_name_their_key(content in file_content()) {
            static N: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "outboxd-prop-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, &content).unwrap();
            let text = MINIMAL.replace(
                "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
                &format!("database_url_file = {:?}", path.display().to_string()),
            );
            let result = load(&text);
            std::fs::remove_file(&path).unwrap();
            if let Err(e) = result {
                let msg = e.to_string();
                prop_assert!(msg.contains("source[0].database_url"), "no key in {}", msg);
                no_mark(&msg)?;
            }
        }

        /// Templates of any shape: loaded ones fit AMQP, refused ones name the key.
        #[test]
        fn routing_key_templates_fit_or_name_their_key(tpl in template()) {
            let text = with_source_line(&format!("routing_key = {tpl:?}"));
            match load(&text) {
                Ok(c) => prop_assert!(c.sources[0].routing_key.literal_len() <= 255),
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("source[0].routing_key"), "no key in {}", msg);
                }
            }
        }
    }
}

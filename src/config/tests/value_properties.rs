//! Properties of the hardening checks (issue 8): durations, URLs,
//! `_file` contents and templates, at random. Whatever the input, loading
//! never panics, an error always names a key, and no error (and no
//! display string) holds a piece of a password.

use super::*;
use crate::telemetry::ErrorChain;
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
                let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
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
// nor anywhere in the chain of causes it keeps
no_mark(&ErrorChain(&e).to_string())?;
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
// nor anywhere in the chain of causes it keeps
no_mark(&ErrorChain(&e).to_string())?;
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
// nor anywhere in the chain of causes it keeps
no_mark(&ErrorChain(&e).to_string())?;
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

//! Bad configs: every command exits 2 before doing anything, naming the
//! key (and the source) of each problem, and no error ever prints a secret.

use crate::support::relay::run_to_end;

const OK_SOURCE: &str = "[rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[[source]]\nname = \"orders\"\ndatabase_url = \"postgres://root@127.0.0.1/x\"\n";

#[test]
fn bad_configs_exit_non_zero_naming_the_key_and_the_source() {
    let long = "x".repeat(300);
    let cases: [(&str, String, &[&str]); 17] = [
        ("syntax", "[rabbitmq\n".into(), &["line 1"]),
        (
            "unknown key",
            format!("{OK_SOURCE}batchsize = 3\n"),
            &["batchsize"],
        ),
        (
            "wrong type",
            format!("{OK_SOURCE}batch_size = \"x\"\n"),
            &["batch_size"],
        ),
        (
            "missing variable",
            OK_SOURCE.replace("root@", "${OUTBOXD_TEST_UNSET_VAR}@"),
            &[
                "OUTBOXD_TEST_UNSET_VAR",
                "source[0].database_url",
                "\"orders\"",
            ],
        ),
        (
            "duplicate name",
            format!(
                "{OK_SOURCE}[[source]]\nname = \"orders\"\ndatabase_url = \"postgres://root@h/y\"\n"
            ),
            &["source[1].name", "duplicate"],
        ),
        (
            "bad url",
            OK_SOURCE.replace("postgres://root@127.0.0.1/x", "mysql:/x"),
            &["source[0].database_url"],
        ),
        (
            "bad template",
            format!("{OK_SOURCE}routing_key = \"{{nope}}\"\n"),
            &["source[0].routing_key", "{nope}"],
        ),
        (
            "hostile table",
            format!("{OK_SOURCE}table = 'outbox\"; DROP TABLE x; --'\n"),
            &["source[0].table", "\"orders\""],
        ),
        // Issue 8, finding 7: values that cannot work. This one panicked
        // (exit 101) multiplying the duration.
        (
            "endless poll interval",
            format!("{OK_SOURCE}poll_interval = \"18446744073709551615s\"\n"),
            &["source[0].poll_interval", "between 10ms and 1h"],
        ),
        (
            "nanosecond confirm timeout",
            OK_SOURCE.replace("[rabbitmq]\n", "[rabbitmq]\nconfirm_timeout = \"1ns\"\n"),
            &["rabbitmq.confirm_timeout", "between 1s and 1h"],
        ),
        (
            "constant routing key too long",
            format!("{OK_SOURCE}routing_key = \"{long}\"\n"),
            &["source[0].routing_key", "300 bytes"],
        ),
        (
            "connection name too long",
            OK_SOURCE.replace(
                "[rabbitmq]\n",
                &format!("[rabbitmq]\nconnection_name = \"{long}\"\n"),
            ),
            &["rabbitmq.connection_name", "300 bytes"],
        ),
        (
            "retention beyond PostgreSQL",
            format!("{OK_SOURCE}after_publish = \"mark\"\nretention = \"500years\"\n"),
            &["source[0].retention", "100years"],
        ),
        (
            "endless secret file",
            OK_SOURCE.replace(
                "database_url = \"postgres://root@127.0.0.1/x\"",
                "database_url_file = \"/dev/zero\"",
            ),
            &["source[0].database_url_file", "more than 64 KiB"],
        ),
        (
            "unknown url parameter",
            OK_SOURCE.replace("127.0.0.1/x", "127.0.0.1/x?sslmod=require"),
            &[
                "source[0].database_url",
                "unknown connection string parameter `sslmod`",
            ],
        ),
        (
            "nested default",
            OK_SOURCE.replace("postgres://root@127.0.0.1/x", "${U:-${V}}"),
            &["source[0].database_url", "nested `${`"],
        ),
        (
            "three-part table",
            format!("{OK_SOURCE}table = \"a.b.c\"\n"),
            &["source[0].table", "\"a.b.c\""],
        ),
    ];
    for (what, text, needles) in cases {
        // Every subcommand loads the config first (README "Commands").
        let commands: [&[&str]; 4] = [
            &["run"],
            &["check"],
            &["migrate"],
            &["dead-letters", "list"],
        ];
        for args in commands {
            let cmd = args.join(" ");
            let (code, _, stderr) = run_to_end(args, &text);
            assert_eq!(code, Some(2), "{what} / {cmd}: exit code, stderr: {stderr}");
            for needle in needles {
                assert!(
                    stderr.contains(needle),
                    "{what} / {cmd}: {needle:?} not in {stderr:?}"
                );
            }
        }
    }
}

/// Issue 8, finding 5: a config error names the key and where it is, and
/// never prints the secret that happens to be on that line or in that URL.
#[test]
fn config_errors_name_the_key_and_never_print_a_secret() {
    const RABBIT: &str = "[rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n";
    const SOURCE: &str =
        "[[source]]\nname = \"orders\"\ndatabase_url = \"postgres://root@127.0.0.1/x\"\n";
    // (what, config, key named, secret)
    let cases: [(&str, String, &str, &str); 8] = [
        // junk after the value: toml used to quote the whole line
        (
            "junk after a url",
            format!("[rabbitmq]\nurl = \"amqp://guest:TomlLeak1@127.0.0.1/%2f\" x\n{SOURCE}"),
            "rabbitmq.url",
            "TomlLeak1",
        ),
        // an unclosed quote
        (
            "unclosed quote",
            format!("[rabbitmq]\nurl = \"amqp://guest:TomlLeak2@127.0.0.1/%2f\n{SOURCE}"),
            "rabbitmq.url",
            "TomlLeak2",
        ),
        // a misspelled key holding a URL
        (
            "misspelled key",
            format!(
                "{RABBIT}[[source]]\nname = \"orders\"\ndatabse_url = \"postgres://root:TomlLeak3@127.0.0.1/x\"\n"
            ),
            "databse_url",
            "TomlLeak3",
        ),
        // serde quoted string values in type errors
        (
            "string for a number",
            format!("{RABBIT}{SOURCE}batch_size = \"TomlLeak4\"\n"),
            "source[0].batch_size",
            "TomlLeak4",
        ),
        // an unencoded `@`: the host used to be `ret7@127.0.0.1`
        (
            "@ in a database password",
            format!(
                "{RABBIT}[[source]]\nname = \"orders\"\ndatabase_url = \"postgres://root:S3c@ret7@127.0.0.1/db\"\n"
            ),
            "source[0].database_url",
            "ret7",
        ),
        // the same in the other half of that password
        (
            "@ in a database password, first half",
            format!(
                "{RABBIT}[[source]]\nname = \"orders\"\ndatabase_url = \"postgres://root:S3c@ret7@127.0.0.1/db\"\n"
            ),
            "%40",
            "S3c",
        ),
        // an unencoded `@` in the broker's password
        (
            "@ in an amqp password",
            format!("[rabbitmq]\nurl = \"amqp://guest:S3c@ret8@127.0.0.1:5672/%2f\"\n{SOURCE}"),
            "rabbitmq.url",
            "ret8",
        ),
        // a bad port in a URL that carries a password
        (
            "bad port",
            format!(
                "{RABBIT}[[source]]\nname = \"orders\"\ndatabase_url = \"postgres://root:TomlLeak5@127.0.0.1:5x/db\"\n"
            ),
            "invalid value for option `port`",
            "TomlLeak5",
        ),
    ];
    for (what, text, key, secret) in cases {
        for cmd in ["run", "check", "migrate"] {
            let (code, out, err) = run_to_end(&[cmd], &text);
            assert_eq!(code, Some(2), "{what} / {cmd}: exit code, stderr: {err}");
            assert!(err.contains(key), "{what} / {cmd}: {key:?} not in {err:?}");
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{what} / {cmd}: {secret:?} leaked: {out}{err}"
            );
        }
    }
}

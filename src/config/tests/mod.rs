//! Config loading: every documented default, and every kind of mistake
//! producing a message that names the key (and the source). One file per
//! concern; the helpers every file uses are here.

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

/// `MINIMAL` with `line` added to the `[[source]]`.
fn with_source_line(line: &str) -> String {
    MINIMAL.replace("name = \"orders\"", &format!("name = \"orders\"\n{line}"))
}

/// `MINIMAL` with `line` added to `[rabbitmq]`.
fn with_rabbit_line(line: &str) -> String {
    MINIMAL.replace("[rabbitmq]\n", &format!("[rabbitmq]\n{line}\n"))
}

mod capture;
mod columns;
mod defaults;
mod format;
mod mistakes;
mod nodes;
mod properties;
mod secrets;
mod tls;
mod value_properties;

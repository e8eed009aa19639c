//! A source's `database_url`: libpq's URL (`postgres://…?k=v`) or keyword
//! (`host=… port=…`) form, checked before tokio-postgres sees it.
//!
//! tokio-postgres reports most mistakes as "invalid connection string" and
//! does not know libpq's `sslmode=verify-full` or `sslrootcert`. So the
//! parameters are read here first: `sslmode` and `sslrootcert` are taken
//! out (they become the source's TLS settings), an unknown parameter is
//! named, and an unencoded `@` in the user name or password (which
//! tokio-postgres would take as part of the host, and then print) is
//! refused. No message here contains a parameter's value or any part of
//! the user name and password.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;

use super::Invalid;
use super::secret::scrub;
use crate::telemetry::ErrorChain;

/// A parsed connection string.
#[derive(Debug)]
pub struct PgUrl {
    /// Everything but TLS (which the source's settings decide).
    pub config: tokio_postgres::Config,
    /// `host:port/dbname as user`, safe to log.
    pub display: String,
    /// libpq's `sslmode` / `sslrootcert`, if the string has them.
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// The parameters tokio-postgres understands, plus `sslrootcert`.
const KNOWN: [&str; 20] = [
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslrootcert",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// libpq parameters outboxd has no use for or no support of.
const UNSUPPORTED: [&str; 16] = [
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "passfile",
    "service",
    "gssencmode",
    "krbsrvname",
    "requirepeer",
    "require_auth",
    "client_encoding",
];

const AT_SIGN: &str = "the URL's `@` is not where it can only end the user name and password: \
     in a postgres:// URL percent-encode `@` as %40, `/` as %2F, `?` as %3F and `%` as %25 \
     in the user name and password (and `@` anywhere else); or use the keyword form \
     (host=… user=… password='…')";

/// Parses a PostgreSQL URL or keyword string and describes it without secrets.
pub fn parse_pg(url: &str) -> Result<PgUrl, Invalid> {
    let (rest, params) = match url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        Some(after_scheme) => split_url(url, after_scheme)?,
        None => (String::new(), keywords(url)?),
    };
    let mut sslmode = None;
    let mut sslrootcert = None;
    let mut kept = Vec::with_capacity(params.len());
    for (key, value) in params {
        check_param(&key)?;
        match key.as_str() {
            "sslmode" => sslmode = Some(value),
            "sslrootcert" => sslrootcert = Some(value),
            _ => kept.push((key, value)),
        }
    }
    let text = if rest.is_empty() {
        // Keyword form: rebuilt with every value quoted.
        let pairs: Vec<String> = kept
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect();
        pairs.join(" ")
    } else {
        let query: Vec<String> = kept
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        if query.is_empty() {
            rest
        } else {
            format!("{rest}?{}", query.join("&"))
        }
    };
    let mut config = tokio_postgres::Config::from_str(&text).map_err(|e| {
        // The cause ("invalid value for option `port`") names no value; the
        // text is scrubbed all the same, in case a future version echoes it,
        // and for that reason the error itself is not kept as a source.
        let cause = scrub(&scrub(&ErrorChain(&e).to_string(), &text), url);
        Invalid::new(format!("not a valid PostgreSQL connection string ({cause}); expected postgres://user@host:5432/dbname or host=… dbname=…"))
    })?;
    if config.get_hosts().is_empty() {
        return Err(Invalid::new(
            "names no host (expected postgres://user@host:5432/dbname)",
        ));
    }
    if config.get_application_name().is_none() {
        config.application_name("outboxd");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let host = match &config.get_hosts()[0] {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("(default user)");
    let db = config.get_dbname().unwrap_or(user);
    let display = format!("{host}:{port}/{db} as {user}");
    Ok(PgUrl {
        config,
        display,
        sslmode,
        sslrootcert,
    })
}

fn check_param(key: &str) -> Result<(), Invalid> {
    if KNOWN.contains(&key) {
        Ok(())
    } else if UNSUPPORTED.contains(&key) {
        Err(Invalid::new(format!(
            "the connection string parameter `{key}` is not supported by outboxd (TLS is set with sslmode and sslrootcert)"
        )))
    } else if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        Err(Invalid::new(format!(
            "unknown connection string parameter `{key}` (known: {})",
            KNOWN.join(", ")
        )))
    } else {
        // Not a parameter name at all (perhaps a stray piece of a value):
        // not echoed.
        Err(Invalid::new(format!(
            "a connection string parameter name is not a name (known: {})",
            KNOWN.join(", ")
        )))
    }
}

/// URL form: (the URL without its query, the query's parameters decoded).
/// The query starts at the first `?` after the user info, as in
/// tokio-postgres, which takes the user info up to the first `@`.
fn split_url(url: &str, after_scheme: &str) -> Result<(String, Vec<(String, String)>), Invalid> {
    let scheme_len = url.len() - after_scheme.len();
    // tokio-postgres ends the user info at the first `@` anywhere, libpq at
    // the first `@` or `/`. They agree, and no piece of a password can end
    // up as the host (which is logged), only with at most one `@`, before
    // any `/` or `?`.
    let first_separator = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
    let at = after_scheme.find('@');
    if after_scheme.matches('@').count() > 1 || at.is_some_and(|at| at > first_separator) {
        return Err(Invalid::new(AT_SIGN));
    }
    let host_start = at.map_or(0, |at| at + 1);
    let Some(q) = after_scheme[host_start..].find('?').map(|i| host_start + i) else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let mut params = Vec::new();
    for pair in after_scheme[q + 1..].split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(Invalid::new(
                "a parameter in the URL's query has no `=` (expected ?key=value&key=value)",
            ));
        };
        params.push((decode(key)?, decode(value)?));
    }
    Ok((url[..scheme_len + q].to_owned(), params))
}

/// Keyword form, as libpq reads it: `key = value` pairs separated by
/// spaces; a value may be single-quoted, and `\` escapes the next character.
fn keywords(text: &str) -> Result<Vec<(String, String)>, Invalid> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Whatever this is, it may be a piece of a password: not echoed.
            return Err(Invalid::new(
                "not a valid PostgreSQL connection string: expected postgres://user@host:5432/dbname, \
                 or key=value pairs (a value with spaces must be single-quoted)",
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(Invalid::new(format!(
                            "the quoted value of `{}` is not closed (a `'` inside a value is written \\')",
                            printable_key(&key)
                        )));
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
            // `user= password=x`: libpq skips the blank after `=`, so the
            // user name would be "password=x", and it is logged.
            if let Some((name, _)) = value.split_once('=')
                && (KNOWN.contains(&name) || UNSUPPORTED.contains(&name))
            {
                return Err(Invalid::new(format!(
                    "the value of `{}` starts with `{name}=`; write an empty value as {}=''",
                    printable_key(&key),
                    printable_key(&key)
                )));
            }
        }
        out.push((key, value));
    }
}

/// A key as it may be printed: itself if it looks like a parameter name.
fn printable_key(key: &str) -> &str {
    if !key.is_empty() && key.len() <= 40 && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    {
        key
    } else {
        "a parameter"
    }
}

/// A keyword-form value in single quotes.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Percent-encodes everything but unreserved characters.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decodes a URL query part (no `+` for space: libpq has none).
fn decode(part: &str) -> Result<String, Invalid> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                // Two hex digits: at most 255, so the cast is lossless.
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Not kept as the cause: a UTF-8 error carries the bytes, maybe a password's.
    String::from_utf8(out).map_err(|_| {
        Invalid::new("a parameter in the URL's query is not UTF-8 once percent-decoded")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_strings_parse_and_lose_only_their_tls_parameters() {
        let cases: [(&str, &str, Option<&str>, Option<&str>); 8] = [
            // a plain URL
            (
                "postgres://root@127.0.0.1:5432/orders",
                "127.0.0.1:5432/orders as root",
                None,
                None,
            ),
            // libpq's verify-full and sslrootcert, which tokio-postgres lacks
            (
                "postgres://root@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
                "h:5432/db as root",
                Some("verify-full"),
                Some("/etc/ca.pem"),
            ),
            // the other parameters stay and still work
            (
                "postgresql://u@h:6000/db?application_name=x&sslmode=require&connect_timeout=3",
                "h:6000/db as u",
                Some("require"),
                None,
            ),
            // a `?` and `/` in the password, encoded
            (
                "postgres://u:p%3Fa%2Fs%3Fs@h/db",
                "h:5432/db as u",
                None,
                None,
            ),
            // an encoded `@` in the password
            (
                "postgres://root:S3c%40ret7@127.0.0.1/db",
                "127.0.0.1:5432/db as root",
                None,
                None,
            ),
            // keyword form, with a quoted value and an escaped quote
            (
                "host=h port=5433 user=u password='a b\\'c' dbname=d sslmode=verify-full sslrootcert='/x y.pem'",
                "h:5433/d as u",
                Some("verify-full"),
                Some("/x y.pem"),
            ),
            // spaces around `=` in the keyword form
            (
                "host = h dbname = d",
                "h:5432/d as (default user)",
                None,
                None,
            ),
            // a host in the query
            ("postgres:///db?host=h&user=u", "h:5432/db as u", None, None),
        ];
        for (input, display, mode, root) in cases {
            let p = parse_pg(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(p.display, display, "{input}");
            assert_eq!(p.sslmode.as_deref(), mode, "{input}");
            assert_eq!(p.sslrootcert.as_deref(), root, "{input}");
        }
        // the password survives the round trip through the rebuilt string
        let p = parse_pg("host=h password='a b\\'c' dbname=d").unwrap();
        assert_eq!(p.config.get_password(), Some("a b'c".as_bytes()));
        let p = parse_pg("postgres://u:S3c%40ret7@h/db?sslmode=require").unwrap();
        assert_eq!(p.config.get_password(), Some("S3c@ret7".as_bytes()));
    }

    #[test]
    fn mistakes_name_their_cause_and_never_a_secret() {
        let cases: [(&str, &str); 14] = [
            // an unencoded `@` in the password: the host would be `ret7@127.0.0.1`
            ("postgres://root:S3c@ret7@127.0.0.1/db", "%40"),
            // the same without a password separator
            ("postgresql://S3c@ret7@h:5432/db", "encode `@` as %40"),
            // a password starting with `@` and holding a `/`: its end
            // would have been the host
            ("postgres://:@S3c/@127.0.0.1/db", "%2F"),
            // an `@` in a parameter without user info: tokio-postgres would
            // take everything before it as the user name
            ("postgres://h/db?password=S3c@ret7", "encode `@` as %40"),
            // an unencoded `/` in a password: libpq would stop there
            ("postgres://u:S3c/ret7@h/db", "`/` as %2F"),
            // a parameter nobody has
            (
                "postgres://root@h/db?sslmod=require",
                "unknown connection string parameter `sslmod`",
            ),
            // a libpq parameter outboxd does not support
            ("host=h sslcert=/x.pem", "`sslcert` is not supported"),
            // a port that is not a number
            ("host=h port=5x", "invalid value for option `port`"),
            // the same in a URL
            ("postgres://root@h:5x/db", "invalid value for option `port`"),
            // an unclosed quote
            (
                "host=h password='S3cret",
                "quoted value of `password` is not closed",
            ),
            // a bare word (a piece of a password with a space)
            ("host=h password=S3c ret", "single-quoted"),
            // a query parameter without `=`
            ("postgres://h/db?S3cret", "has no `=`"),
            // no host at all
            ("dbname=x", "names no host"),
            // an empty value followed by a blank: the next pair would
            // become the value (a user name of "password=S3cret", logged)
            (
                "host=h user= password=S3cret",
                "write an empty value as user=''",
            ),
        ];
        for (input, needle) in cases {
            let msg = parse_pg(input).map(|_| ()).unwrap_err().to_string();
            assert!(msg.contains(needle), "{input}: {needle:?} not in {msg:?}");
            for secret in ["S3c", "ret7", "S3cret"] {
                assert!(!msg.contains(secret), "{input}: {secret} leaked in {msg:?}");
            }
        }
    }
}

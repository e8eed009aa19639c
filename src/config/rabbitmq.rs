//! The `[rabbitmq]` table.

use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};

use super::raw::RawRabbit;
use super::secret::scrub;
use super::{DurationRange, Invalid, Secret, Validator};
use crate::tls::{Trust, tls_client_config};

/// How long a batch waits for the broker's confirms before it counts them as failed.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Allowed `confirm_timeout`: below a second, confirms that are merely a
/// little slow count as failures and every batch is sent again (1 ns made
/// 373 duplicates of 500 rows).
pub const CONFIRM_TIMEOUT_RANGE: DurationRange =
    DurationRange::new(Duration::from_secs(1), Duration::from_secs(3600));
/// `connection_name` is sent as a client property; RabbitMQ resets a
/// connection whose properties are huge, so the name is kept to what an
/// AMQP short string holds.
pub const MAX_CONNECTION_NAME_BYTES: usize = 255;

#[derive(Debug, Clone)]
pub struct RabbitConfig {
    pub url: Secret,
    /// `host:port/vhost as user`, safe to log.
    pub display: String,
    pub confirm_timeout: Duration,
    pub connection_name: String,
    /// `Some` exactly when the URL is amqps://: every connection then does
    /// a TLS handshake first (never plain TCP), see `sink::rabbitmq::tls`.
    pub tls: Option<AmqpTls>,
}

/// TLS settings of an amqps:// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpTls {
    /// Whose certificate the broker may present: `tls_ca_file`, else the
    /// system's roots; nobody's in particular only with
    /// `tls_insecure_skip_verify = true`.
    pub trust: Trust,
    /// A client certificate and key (PEM) for mutual TLS.
    pub client: Option<(String, String)>,
}

impl AmqpTls {
    /// "TLS, certificate verified against …", for `check` and the logs.
    pub fn describe(&self) -> String {
        let mut out = format!("TLS, {}", self.trust.describe());
        if self.trust == Trust::Anyone {
            out.push_str(" (tls_insecure_skip_verify = true: anyone on the network path can pose as the broker and read the credentials)");
        }
        if let Some((cert, _)) = &self.client {
            out.push_str(&format!(", client certificate {cert}"));
        }
        out
    }
}

impl RabbitConfig {
    /// `host:port/vhost as user`, plus what TLS checks for amqps://.
    pub fn describe(&self) -> String {
        match &self.tls {
            None => self.display.clone(),
            Some(tls) => format!("{} ({})", self.display, tls.describe()),
        }
    }
}

impl Validator<'_> {
    pub(super) fn rabbitmq(&mut self, raw: RawRabbit) -> Option<RabbitConfig> {
        let url = self.secret("rabbitmq.url", "rabbitmq.url_file", raw.url, raw.url_file);
        let confirm_timeout = self
            .duration_in(
                "rabbitmq.confirm_timeout",
                raw.confirm_timeout,
                CONFIRM_TIMEOUT_RANGE,
            )
            .unwrap_or(DEFAULT_CONFIRM_TIMEOUT);
        let connection_name = self
            .string_opt("rabbitmq.connection_name", raw.connection_name)
            .unwrap_or_else(|| "outboxd".to_owned());
        if connection_name.len() > MAX_CONNECTION_NAME_BYTES {
            self.invalid(
                "rabbitmq.connection_name",
                format!(
                    "is {} bytes long; at most {MAX_CONNECTION_NAME_BYTES} (the broker resets connections with huge client properties)",
                    connection_name.len()
                ),
            );
        }
        let tls_ca_file = self.string_opt("rabbitmq.tls_ca_file", raw.tls_ca_file);
        let cert = self.string_opt("rabbitmq.tls_cert_file", raw.tls_cert_file);
        let key = self.string_opt("rabbitmq.tls_key_file", raw.tls_key_file);
        let skip_verify = raw.tls_insecure_skip_verify.unwrap_or(false);
        let url = url?;
        let (display, amqps) = self.check("rabbitmq.url", amqp_display(url.expose()))?;
        let tls = if amqps {
            self.amqp_tls(tls_ca_file, cert, key, skip_verify)
        } else {
            let given = [
                ("rabbitmq.tls_ca_file", tls_ca_file.is_some()),
                ("rabbitmq.tls_cert_file", cert.is_some()),
                ("rabbitmq.tls_key_file", key.is_some()),
                ("rabbitmq.tls_insecure_skip_verify", skip_verify),
            ];
            for (key, _) in given.iter().filter(|(_, set)| *set) {
                self.invalid(key, "TLS settings need an amqps:// url");
            }
            None
        };
        Some(RabbitConfig {
            url,
            display,
            confirm_timeout,
            connection_name,
            tls,
        })
    }

    /// The TLS settings of an amqps:// url, built once here so that an
    /// unreadable CA, certificate or key file is a config error.
    fn amqp_tls(
        &mut self,
        ca_file: Option<String>,
        cert: Option<String>,
        key: Option<String>,
        skip_verify: bool,
    ) -> Option<AmqpTls> {
        let trust = match (ca_file, skip_verify) {
            (Some(_), true) => {
                self.invalid(
                    "rabbitmq.tls_insecure_skip_verify",
                    "tls_ca_file asks for verification; remove one of the two",
                );
                return None;
            }
            (Some(path), false) => Trust::CaFile(path),
            (None, false) => Trust::SystemRoots,
            (None, true) => Trust::Anyone,
        };
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                self.invalid(
                    "rabbitmq.tls_key_file",
                    "missing; tls_cert_file needs its key",
                );
                return None;
            }
            (None, Some(_)) => {
                self.invalid(
                    "rabbitmq.tls_cert_file",
                    "missing; tls_key_file needs its certificate",
                );
                return None;
            }
        };
        let key = match (&trust, &client) {
            (Trust::CaFile(_), _) => "rabbitmq.tls_ca_file",
            (_, Some(_)) => "rabbitmq.tls_cert_file",
            _ => "rabbitmq.url",
        };
        let built = tls_client_config(
            &trust,
            client.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        );
        self.check(key, built.map(|_| AmqpTls { trust, client }))
    }
}

/// What to do about reserved characters in the user info of a URL.
const ENCODE_HINT: &str = "percent-encode these characters in the user name and password: \
     `@` as %40, `/` as %2F, `?` as %3F, `#` as %23, `%` as %25 (and `:` as %3A in the user name)";

/// Validates an AMQP URL and describes it without its password; `true`
/// for amqps:// (in any letter case).
pub fn amqp_display(url: &str) -> Result<(String, bool), Invalid> {
    // The URL parser takes the host part to end at the first `/`, `?` or
    // `#`, and the user info to end at the last `@` before that. A password
    // with an unencoded `@`, `/`, `?` or `#` is then read wrongly, and a
    // piece of it can become the host or the port, which are logged. So:
    // exactly one `@` if any, and inside the host part. Nothing of the URL
    // is echoed.
    let after_scheme = url.split_once("://").map_or("", |(_, rest)| rest);
    let authority = &after_scheme[..after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len())];
    if after_scheme.matches('@').count() > 1 {
        return Err(Invalid::new(format!(
            "the URL has more than one `@` (write an `@` in the vhost as %40); {ENCODE_HINT}"
        )));
    }
    if !authority.contains('@') && after_scheme.contains('@') {
        return Err(Invalid::new(format!(
            "the host part ends before the URL's `@`; {ENCODE_HINT}"
        )));
    }
    // lapin's error is text that may quote the URL: scrubbed, not kept.
    let uri: AMQPUri = url.parse().map_err(|e: String| {
        Invalid::new(format!(
            "not a valid AMQP URL (expected amqp://user:password@host:5672/vhost): {}",
            scrub(&e, url)
        ))
    })?;
    let a = &uri.authority;
    let display = format!(
        "{}:{}/{} as {}",
        a.host, a.port, uri.vhost, a.userinfo.username
    );
    Ok((display, uri.scheme == AMQPScheme::AMQPS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_reserved_characters_in_the_password_are_refused_without_echo() {
        let cases: [(&str, Result<&str, &str>); 9] = [
            // an ordinary URL
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                Ok("127.0.0.1:5672// as guest"),
            ),
            // an encoded `@` in the password is fine
            ("amqps://guest:S3c%40ret7@h/v", Ok("h:5671/v as guest")),
            // an `@` in a vhost is encoded too
            ("amqp://g:g@h/v%40x", Ok("h:5672/v@x as g")),
            // an unencoded one could be a password's: refused
            ("amqp://g:g@h/v@x", Err("more than one `@`")),
            // a password starting with `@` and holding a `?` used to make
            // its end the host
            ("amqp://guest:@ret7?@127.0.0.1", Err("more than one `@`")),
            // a password of digits before a `/` would have become the port
            (
                "amqp://guest:1234/ret7@127.0.0.1/%2f",
                Err("host part ends before"),
            ),
            // an unencoded `@` in the password
            (
                "amqp://guest:S3c@ret7@127.0.0.1:5672/%2f",
                Err("more than one `@`"),
            ),
            // a `/` in the password cuts the host part short
            ("amqp://guest:S3c/ret7@127.0.0.1/%2f", Err("`/` as %2F")),
            // a `#` likewise
            ("amqp://guest:S3c#ret7@127.0.0.1/%2f", Err("`#` as %23")),
        ];
        for (url, want) in cases {
            match (amqp_display(url), want) {
                (Ok((display, _)), Ok(want)) => assert_eq!(display, want, "{url}"),
                (Err(msg), Err(needle)) => {
                    let msg = msg.to_string();
                    assert!(msg.contains(needle), "{url}: {needle:?} not in {msg:?}");
                    assert!(
                        !msg.contains("S3c") && !msg.contains("ret7"),
                        "{url}: {msg}"
                    );
                }
                (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
            }
        }
    }
}

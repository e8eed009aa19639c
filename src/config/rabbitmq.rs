//! The `[rabbitmq]` table.

use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};

use super::raw::{OneOrMany, RawRabbit};
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
    /// The broker's nodes, in config order; never empty. outboxd keeps one
    /// connection, to one of them (see `sink::rabbitmq::nodes`).
    pub nodes: Vec<RabbitNode>,
    /// Every node's `host:port/vhost as user`, comma-separated, safe to log.
    pub display: String,
    pub confirm_timeout: Duration,
    pub connection_name: String,
    /// `Some` exactly when the URLs are amqps:// (all nodes use the same
    /// scheme): every connection then does a TLS handshake first (never
    /// plain TCP), see `sink::rabbitmq::tls`.
    pub tls: Option<AmqpTls>,
}

/// One broker node of `rabbitmq.url` or `rabbitmq.urls`.
#[derive(Debug, Clone)]
pub struct RabbitNode {
    pub url: Secret,
    /// `host:port/vhost as user`, safe to log.
    pub display: String,
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
    /// `host:port/vhost as user` of every node, plus what TLS checks for amqps://.
    pub fn describe(&self) -> String {
        self.with_tls(&self.display)
    }

    /// The same for node `i` alone (index into `nodes`).
    pub fn describe_node(&self, i: usize) -> String {
        match self.nodes.get(i) {
            Some(node) => self.with_tls(&node.display),
            None => self.describe(),
        }
    }

    fn with_tls(&self, display: &str) -> String {
        match &self.tls {
            None => display.to_owned(),
            Some(tls) => format!("{display} ({})", tls.describe()),
        }
    }
}

impl Validator<'_> {
    pub(super) fn rabbitmq(&mut self, raw: RawRabbit) -> Option<RabbitConfig> {
        let urls = self.node_urls(raw.url, raw.urls, raw.url_file);
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
        let (nodes, amqps) = self.nodes(urls?)?;
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
        let display = nodes
            .iter()
            .map(|n| n.display.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Some(RabbitConfig {
            nodes,
            display,
            confirm_timeout,
            connection_name,
            tls,
        })
    }

    /// The node URLs with the key each came from: `url = "…"` (or
    /// `url_file`, one URL a line), `url = [...]` or `urls = [...]`.
    fn node_urls(
        &mut self,
        url: Option<OneOrMany>,
        urls: Option<Vec<String>>,
        url_file: Option<String>,
    ) -> Option<Vec<(String, Secret)>> {
        let (base, list) = match (url, urls) {
            (Some(_), Some(_)) => {
                self.invalid(
                    "rabbitmq.urls",
                    "rabbitmq.url and rabbitmq.urls are both set; list the nodes in one of them",
                );
                return None;
            }
            (None, Some(_)) if url_file.is_some() => {
                self.invalid(
                    "rabbitmq.urls",
                    "rabbitmq.url_file and rabbitmq.urls are both set; list the nodes in one of them",
                );
                return None;
            }
            (None, Some(list)) => ("rabbitmq.urls", list),
            (Some(OneOrMany::Many(_)), None) if url_file.is_some() => {
                self.invalid(
                    "rabbitmq.url",
                    "give the value or its `_file` variant, not both",
                );
                return None;
            }
            (Some(OneOrMany::Many(list)), None) => ("rabbitmq.url", list),
            (Some(OneOrMany::One(one)), None) => {
                let url = self.secret("rabbitmq.url", "rabbitmq.url_file", Some(one), url_file)?;
                return Some(vec![("rabbitmq.url".to_owned(), url)]);
            }
            (None, None) => {
                let from_file = url_file.is_some();
                let url = self.secret("rabbitmq.url", "rabbitmq.url_file", None, url_file)?;
                if !from_file || !url.expose().contains('\n') {
                    return Some(vec![("rabbitmq.url".to_owned(), url)]);
                }
                // A mounted secret with one node URL a line.
                return Some(
                    url.expose()
                        .lines()
                        .enumerate()
                        .filter(|(_, line)| !line.trim().is_empty())
                        .map(|(i, line)| {
                            let key = format!("rabbitmq.url_file (line {})", i + 1);
                            (key, Secret::new(line.trim().to_owned()))
                        })
                        .collect(),
                );
            }
        };
        if list.is_empty() {
            self.invalid(base, "is an empty list; give at least one node URL");
            return None;
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, value) in list.into_iter().enumerate() {
            let key = format!("{base}[{i}]");
            let Some(value) = self.string_opt(&key, Some(value)) else {
                continue;
            };
            if value.is_empty() {
                self.invalid(&key, "is empty");
                continue;
            }
            out.push((key, Secret::new(value)));
        }
        Some(out)
    }

    /// Validates each node URL; `true` for amqps://. Every node must use
    /// the same scheme (the TLS settings are shared) and name another node.
    fn nodes(&mut self, urls: Vec<(String, Secret)>) -> Option<(Vec<RabbitNode>, bool)> {
        let mut nodes: Vec<(String, RabbitNode, bool)> = Vec::with_capacity(urls.len());
        let mut bad = false;
        for (key, url) in urls {
            let Some((display, amqps)) = self.check(&key, amqp_display(url.expose())) else {
                bad = true;
                continue;
            };
            if let Some((first, _, first_amqps)) = nodes.first()
                && *first_amqps != amqps
            {
                let (this, that) = if amqps {
                    ("amqps://", "amqp://")
                } else {
                    ("amqp://", "amqps://")
                };
                self.invalid(
                    &key,
                    format!("is {this} but {first} is {that}; all nodes use the same scheme (the TLS settings are shared)"),
                );
                bad = true;
            }
            if let Some((other, _, _)) = nodes.iter().find(|(_, n, _)| n.display == display) {
                self.invalid(&key, format!("names the same node as {other} ({display})"));
                bad = true;
            }
            nodes.push((key, RabbitNode { url, display }, amqps));
        }
        if bad {
            return None;
        }
        let amqps = nodes.first().is_some_and(|(_, _, amqps)| *amqps);
        Some((nodes.into_iter().map(|(_, n, _)| n).collect(), amqps))
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

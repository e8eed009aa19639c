//! The `[rabbitmq]` table.

use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};

use super::raw::RawRabbit;
use super::secret::scrub;
use super::{Secret, Validator};

/// How long a batch waits for the broker's confirms before it counts them as failed.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RabbitConfig {
    pub url: Secret,
    /// `host:port/vhost as user`, safe to log.
    pub display: String,
    pub confirm_timeout: Duration,
    pub connection_name: String,
    /// For amqps://: a CA bundle (PEM) instead of the system's roots, and
    /// an optional client certificate and key (PEM) for mutual TLS.
    pub tls_ca_file: Option<String>,
    pub tls_client: Option<(String, String)>,
}

impl Validator<'_> {
    pub(super) fn rabbitmq(&mut self, raw: RawRabbit) -> Option<RabbitConfig> {
        let url = self.secret("rabbitmq.url", "rabbitmq.url_file", raw.url, raw.url_file);
        let confirm_timeout = self
            .duration_opt("rabbitmq.confirm_timeout", raw.confirm_timeout)
            .unwrap_or(DEFAULT_CONFIRM_TIMEOUT);
        if confirm_timeout.is_zero() {
            self.invalid("rabbitmq.confirm_timeout", "must be greater than zero");
        }
        let connection_name = self
            .string_opt("rabbitmq.connection_name", raw.connection_name)
            .unwrap_or_else(|| "outboxd".to_owned());
        let tls_ca_file = self.string_opt("rabbitmq.tls_ca_file", raw.tls_ca_file);
        if let Some(path) = &tls_ca_file {
            self.check(
                "rabbitmq.tls_ca_file",
                crate::tls::read_certs(path).map(|_| ()),
            );
        }
        let cert = self.string_opt("rabbitmq.tls_cert_file", raw.tls_cert_file);
        let key = self.string_opt("rabbitmq.tls_key_file", raw.tls_key_file);
        let tls_client = match (cert, key) {
            (Some(c), Some(k)) => {
                self.check(
                    "rabbitmq.tls_cert_file",
                    crate::tls::read_certs(&c).map(|_| ()),
                );
                if !std::path::Path::new(&k).is_file() {
                    self.invalid(
                        "rabbitmq.tls_key_file",
                        format!("{k:?} is not a readable file"),
                    );
                }
                Some((c, k))
            }
            (None, None) => None,
            _ => {
                self.invalid(
                    "rabbitmq.tls_cert_file",
                    "give tls_cert_file and tls_key_file together",
                );
                None
            }
        };
        let url = url?;
        let display = self.check("rabbitmq.url", amqp_display(url.expose()))?;
        let tls_wanted = tls_ca_file.is_some() || tls_client.is_some();
        if tls_wanted && !url.expose().starts_with("amqps://") {
            self.invalid("rabbitmq.tls_ca_file", "TLS settings need an amqps:// url");
        }
        Some(RabbitConfig {
            url,
            display,
            confirm_timeout,
            connection_name,
            tls_ca_file,
            tls_client,
        })
    }
}

/// Validates an AMQP URL and describes it without its password.
pub fn amqp_display(url: &str) -> Result<String, String> {
    let uri: AMQPUri = url.parse().map_err(|e: String| {
        format!(
            "not a valid AMQP URL (expected amqp://user:password@host:5672/vhost): {}",
            scrub(&e, url)
        )
    })?;
    let a = &uri.authority;
    let tls = if uri.scheme == AMQPScheme::AMQPS {
        " (TLS)"
    } else {
        ""
    };
    Ok(format!(
        "{}:{}/{} as {}{tls}",
        a.host, a.port, uri.vhost, a.userinfo.username
    ))
}

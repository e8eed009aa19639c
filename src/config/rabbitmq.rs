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
        let url = url?;
        let display = self.check("rabbitmq.url", amqp_display(url.expose()))?;
        Some(RabbitConfig {
            url,
            display,
            confirm_timeout,
            connection_name,
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
    if uri.scheme == AMQPScheme::AMQPS {
        return Err("amqps:// is not supported by this build yet; use amqp://".to_owned());
    }
    let a = &uri.authority;
    Ok(format!(
        "{}:{}/{} as {}",
        a.host, a.port, uri.vhost, a.userinfo.username
    ))
}

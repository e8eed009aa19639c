//! The file as serde sees it: unknown keys rejected, strings left raw so
//! that `${VAR}` works in every string value (durations and enums included).

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub metrics: RawMetrics,
    pub rabbitmq: Option<RawRabbit>,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default, rename = "source")]
    pub sources: Vec<RawSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
    pub backlog_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRabbit {
    pub url: Option<OneOrMany>,
    pub urls: Option<Vec<String>>,
    pub url_file: Option<String>,
    pub confirm_timeout: Option<String>,
    pub connection_name: Option<String>,
    pub tls_ca_file: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_insecure_skip_verify: Option<bool>,
}

/// `url = "amqp://…"` or `url = ["amqp://…", …]`.
#[derive(Debug)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL string or a list of URL strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut all = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    all.push(url);
                }
                Ok(OneOrMany::Many(all))
            }
        }
        d.deserialize_any(Visit)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub name: Option<String>,
    pub database_url: Option<String>,
    pub database_url_file: Option<String>,
    pub table: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub batch_size: Option<i64>,
    pub poll_interval: Option<String>,
    pub after_publish: Option<String>,
    pub retention: Option<String>,
    pub max_in_flight: Option<i64>,
    pub ordering: Option<String>,
    pub on_park: Option<String>,
    pub pool_size: Option<i64>,
    pub retry_initial: Option<String>,
    pub retry_max: Option<String>,
    pub max_attempts: Option<i64>,
    pub max_message_bytes: Option<i64>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub notify_channel: Option<String>,
    pub capture: Option<String>,
    pub slot: Option<String>,
    pub publication: Option<String>,
    pub message_format: Option<String>,
    pub cloudevents_source: Option<String>,
    pub layout: Option<String>,
    pub columns: Option<RawColumns>,
}

/// `[source.columns]`: the producers' column names of a mapped table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawColumns {
    pub id: Option<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub payload: Option<String>,
    pub dedup_key: Option<String>,
    pub headers: Option<String>,
    pub created_at: Option<String>,
    pub header_columns: Option<Vec<String>>,
}

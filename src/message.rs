//! A claimed outbox row, and how it becomes an AMQP message.
//!
//! Everything that can be wrong with a row's content is found here, before
//! anything is sent: values longer than AMQP's 255-byte short strings,
//! headers that are not a flat JSON object, an empty rendered routing key.
//! Such a row is a [`BadRow`]: it is not published, it is retried with
//! backoff and its `last_error` names the problem, so an operator can fix it.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;

pub mod cloudevents;

use crate::config::{MessageFormat, SourceConfig};
use crate::outcome::{Failure, FailureReason};
use crate::template::{Template, Values};

/// One row as the claim query returns it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The jsonb payload as PostgreSQL prints it (`payload::text`).
    pub payload: String,
    /// The jsonb headers as PostgreSQL prints them (`headers::text`); parsed
    /// here, so a hostile value (say, nested deeper than the parser allows)
    /// makes a bad row, not a failed batch.
    pub headers: String,
    pub dedup_key: String,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub created_at: SystemTime,
    pub attempts: i32,
    /// Set when a column could not be read (a NULL where a value is
    /// needed, say): the row is a bad row, parked with this as its reason.
    pub undecodable: Option<String>,
}

/// What a row needs from its source to become a message.
pub struct Routing<'a> {
    pub source: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a Template,
    /// Largest body allowed (`max_message_bytes`).
    pub max_body: usize,
    /// `message_format`.
    pub format: &'a MessageFormat,
}

impl<'a> Routing<'a> {
    /// A source's routing settings.
    pub fn of(cfg: &'a SourceConfig) -> Self {
        Self {
            source: &cfg.name,
            exchange: &cfg.exchange,
            routing_key: &cfg.routing_key,
            max_body: cfg.max_message_bytes,
            format: &cfg.format,
        }
    }
}

/// A message ready for `basic_publish`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    /// The row it came from (the publisher remembers rows it must send
    /// alone after the broker closed a channel they were in flight on).
    pub row_id: i64,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Why a row cannot be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRow {
    #[error("{field} is {len} bytes long; AMQP allows at most 255")]
    TooLong { field: &'static str, len: usize },
    #[error("the routing key rendered from template {template:?} is empty")]
    EmptyRoutingKey { template: String },
    #[error("headers must be a JSON object, got {0}")]
    HeadersNotObject(&'static str),
    #[error("headers are not JSON this relay can read: {0}")]
    HeadersUnreadable(String),
    #[error("the payload is {len} bytes; max_message_bytes allows {max}")]
    TooLarge { len: usize, max: usize },
    #[error("header {key:?} is {kind}; header values must be strings, numbers, booleans or null")]
    HeaderValue { key: String, kind: &'static str },
    #[error("the row cannot be read: {0}")]
    Undecodable(String),
}

pub const APP_ID: &str = "outboxd";
pub const CONTENT_TYPE: &str = "application/json";
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

impl OutboxRow {
    /// The (aggregate_type, aggregate_id) pair that orders its rows.
    pub fn aggregate(&self) -> (&str, &str) {
        (&self.aggregate_type, &self.aggregate_id)
    }

    /// [`Self::to_outbound`] as a publisher's entry: a row that cannot be
    /// a message is a `bad_row` failure of its own.
    pub fn to_sendable(&self, r: &Routing<'_>) -> Result<Outbound, Failure> {
        self.to_outbound(r)
            .map_err(|bad| Failure::new(FailureReason::BadRow, bad.to_string()))
    }

    /// Builds the AMQP message for this row.
    pub fn to_outbound(&self, r: &Routing<'_>) -> Result<Outbound, BadRow> {
        if let Some(problem) = &self.undecodable {
            return Err(BadRow::Undecodable(problem.clone()));
        }
        // Compaction only removes bytes, so the text length is an upper bound.
        if self.payload.len() > r.max_body {
            let len = compact_json(&self.payload).len();
            if len > r.max_body {
                return Err(BadRow::TooLarge {
                    len,
                    max: r.max_body,
                });
            }
        }
        let exchange = short("exchange", self.exchange.as_deref().unwrap_or(r.exchange))?;
        let routing_key = match &self.routing_key {
            // An explicit per-row key is taken as given, even an empty one
            // (fanout and headers exchanges ignore it).
            Some(key) => short("routing_key", key)?,
            None => {
                let key = r.routing_key.render(&Values {
                    aggregate_type: &self.aggregate_type,
                    aggregate_id: &self.aggregate_id,
                    event_type: &self.event_type,
                    source: r.source,
                });
                if key.is_empty() && !r.routing_key.is_constant() {
                    return Err(BadRow::EmptyRoutingKey {
                        template: r.routing_key.to_string(),
                    });
                }
                short("routing_key", key)?
            }
        };
        let message_id = short("dedup_key", self.dedup_key.as_str())?;
        let kind = short("event_type", self.event_type.as_str())?;
        let mut headers = self.row_headers()?;
        // Ours are set last, so a row cannot spoof where it came from.
        headers.insert("x-outbox-source".into(), long_string(r.source));
        // An `outbox_emit()` message (capture = "wal") has no row: id 0.
        if self.id > 0 {
            headers.insert("x-outbox-id".into(), AMQPValue::LongLongInt(self.id));
        }
        headers.insert("x-aggregate-type".into(), long_string(&self.aggregate_type));
        headers.insert("x-aggregate-id".into(), long_string(&self.aggregate_id));
        if let MessageFormat::CloudEvents { source } = r.format {
            cloudevents::add(
                &mut headers,
                &cloudevents::Attributes {
                    id: &self.dedup_key,
                    source,
                    event_type: &self.event_type,
                    time: self.created_at,
                    subject: &self.aggregate_id,
                },
            );
        }
        let timestamp = self
            .created_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let properties = BasicProperties::default()
            .with_message_id(message_id)
            .with_type(kind)
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_timestamp(timestamp)
            .with_app_id(APP_ID.into())
            .with_headers(headers);
        Ok(Outbound {
            row_id: self.id,
            exchange,
            routing_key,
            body: compact_json(&self.payload),
            properties,
        })
    }

    fn row_headers(&self) -> Result<FieldTable, BadRow> {
        if self.headers.is_empty() || self.headers == "{}" {
            return Ok(FieldTable::default());
        }
        let parsed: Value = serde_json::from_str(&self.headers)
            .map_err(|e| BadRow::HeadersUnreadable(e.to_string()))?;
        let map = match &parsed {
            Value::Object(map) => map,
            Value::Null => return Ok(FieldTable::default()),
            other => return Err(BadRow::HeadersNotObject(json_kind(other))),
        };
        let mut table = FieldTable::default();
        for (key, value) in map {
            let amqp = match value {
                Value::String(s) => long_string(s),
                Value::Bool(b) => AMQPValue::Boolean(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => AMQPValue::LongLongInt(i),
                    // u64 beyond i64 and fractions both fit a double
                    None => AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN)),
                },
                Value::Null => AMQPValue::Void,
                other => {
                    return Err(BadRow::HeaderValue {
                        key: truncate(key, 64),
                        kind: json_kind(other),
                    });
                }
            };
            table.insert(short("header name", key.as_str())?, amqp);
        }
        Ok(table)
    }

    /// Seconds from `created_at` to `now`, never negative (clocks can disagree).
    pub fn age_at(&self, now: SystemTime) -> f64 {
        now.duration_since(self.created_at)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

fn short(field: &'static str, value: impl Into<String>) -> Result<ShortString, BadRow> {
    let value = value.into();
    let len = value.len();
    ShortString::try_new(value).map_err(|_| BadRow::TooLong { field, len })
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Removes the whitespace PostgreSQL puts into `jsonb::text` output
/// (`{"a": 1, "b": [1, 2]}` becomes `{"a":1,"b":[1,2]}`), leaving strings
/// untouched. One pass, no parsing: jsonb output is already valid JSON.
pub fn compact_json(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Copy the whole string literal in one go, escapes included.
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
                out.extend_from_slice(&bytes[start..i]);
            }
            b' ' | b'\n' | b'\t' | b'\r' => i += 1,
            _ => {
                // A run of structural characters, numbers and literals.
                let start = i;
                while i < bytes.len() && !matches!(bytes[i], b'"' | b' ' | b'\n' | b'\t' | b'\r') {
                    i += 1;
                }
                out.extend_from_slice(&bytes[start..i]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> OutboxRow {
        OutboxRow {
            id: 7,
            aggregate_type: "order".into(),
            aggregate_id: "o-42".into(),
            event_type: "OrderCreated".into(),
            payload: r#"{"a": 1, "s": "x y"}"#.into(),
            headers: json!({"tenant": "t1", "n": 3, "f": 1.5, "ok": true, "none": null})
                .to_string(),
            dedup_key: "k-1".into(),
            exchange: None,
            routing_key: None,
            created_at: UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            attempts: 0,
            undecodable: None,
        }
    }

    fn routing(t: &Template) -> Routing<'_> {
        Routing {
            source: "orders",
            exchange: "orders.events",
            routing_key: t,
            max_body: 1024,
            format: &MessageFormat::Plain,
        }
    }

    #[test]
    fn maps_a_row_to_the_documented_message() {
        let t = Template::parse("{aggregate_type}.{event_type}").unwrap();
        let m = row().to_outbound(&routing(&t)).unwrap();
        assert_eq!(m.exchange.as_str(), "orders.events");
        assert_eq!(m.routing_key.as_str(), "order.OrderCreated");
        assert_eq!(m.body, br#"{"a":1,"s":"x y"}"#);
        let p = &m.properties;
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "k-1");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "OrderCreated");
        assert_eq!(p.content_type().as_ref().unwrap().as_str(), CONTENT_TYPE);
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), APP_ID);
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("x-outbox-id"), Some(&AMQPValue::LongLongInt(7)));
        assert_eq!(h.get("x-outbox-source"), Some(&long_string("orders")));
        assert_eq!(h.get("x-aggregate-type"), Some(&long_string("order")));
        assert_eq!(h.get("x-aggregate-id"), Some(&long_string("o-42")));
        assert_eq!(h.get("tenant"), Some(&long_string("t1")));
        assert_eq!(h.get("n"), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(h.get("f"), Some(&AMQPValue::Double(1.5)));
        assert_eq!(h.get("ok"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(h.get("none"), Some(&AMQPValue::Void));
    }

    #[test]
    fn row_overrides_win_but_our_headers_cannot_be_spoofed() {
        let t = Template::parse("{event_type}").unwrap();
        let mut r = row();
        r.exchange = Some("other".into());
        r.routing_key = Some("explicit.key".into());
        r.headers = json!({"x-outbox-id": "fake"}).to_string();
        let m = r.to_outbound(&routing(&t)).unwrap();
        assert_eq!(m.exchange.as_str(), "other");
        assert_eq!(m.routing_key.as_str(), "explicit.key");
        let h = m.properties.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("x-outbox-id"), Some(&AMQPValue::LongLongInt(7)));
    }

    #[test]
    fn bad_rows_are_reported_not_panicked_over() {
        let t = Template::parse("{aggregate_id}").unwrap();
        let long = "x".repeat(256);
        type Mutation = Box<dyn Fn(&mut OutboxRow)>;
        let cases: Vec<(Mutation, BadRow)> = vec![
            // dedup key over 255 bytes (ShortString would panic on From)
            (
                Box::new(|r| r.dedup_key = "k".repeat(300)),
                BadRow::TooLong {
                    field: "dedup_key",
                    len: 300,
                },
            ),
            // event type over 255 bytes
            (
                Box::new(|r| r.event_type = "e".repeat(256)),
                BadRow::TooLong {
                    field: "event_type",
                    len: 256,
                },
            ),
            // per-row exchange over 255 bytes
            (
                Box::new(move |r| r.exchange = Some(long.clone())),
                BadRow::TooLong {
                    field: "exchange",
                    len: 256,
                },
            ),
            // rendered routing key over 255 bytes
            (
                Box::new(|r| r.aggregate_id = "a".repeat(400)),
                BadRow::TooLong {
                    field: "routing_key",
                    len: 400,
                },
            ),
            // rendered routing key empty
            (
                Box::new(|r| r.aggregate_id = String::new()),
                BadRow::EmptyRoutingKey {
                    template: "{aggregate_id}".into(),
                },
            ),
            // headers an array
            (
                Box::new(|r| r.headers = json!([1]).to_string()),
                BadRow::HeadersNotObject("an array"),
            ),
            // nested header value
            (
                Box::new(|r| r.headers = json!({"deep": {"x": 1}}).to_string()),
                BadRow::HeaderValue {
                    key: "deep".into(),
                    kind: "an object",
                },
            ),
            // a payload over max_message_bytes (1024 in these tests)
            (
                Box::new(|r| r.payload = format!("\"{}\"", "p".repeat(2000))),
                BadRow::TooLarge {
                    len: 2002,
                    max: 1024,
                },
            ),
            // headers nested deeper than the JSON parser allows
            (
                Box::new(|r| r.headers = format!("{}1{}", "[".repeat(200), "]".repeat(200))),
                BadRow::HeadersUnreadable("recursion limit exceeded at line 1 column 128".into()),
            ),
            // header name over 255 bytes
            (
                Box::new(|r| r.headers = json!({ "h".repeat(256): 1 }).to_string()),
                BadRow::TooLong {
                    field: "header name",
                    len: 256,
                },
            ),
        ];
        for (i, (mutate, want)) in cases.into_iter().enumerate() {
            let mut r = row();
            mutate(&mut r);
            assert_eq!(r.to_outbound(&routing(&t)).unwrap_err(), want, "case {i}");
        }
    }

    #[test]
    fn compacts_jsonb_text_without_touching_strings() {
        let cases = [
            // PostgreSQL's jsonb::text spacing
            (r#"{"a": 1, "b": [1, 2]}"#, r#"{"a":1,"b":[1,2]}"#),
            // spaces, escaped quotes and backslashes inside strings survive
            (
                r#"{"s": "a \" b \\", "t": " "}"#,
                r#"{"s":"a \" b \\","t":" "}"#,
            ),
            // scalars and unicode
            (r#""é ü""#, r#""é ü""#),
            ("null", "null"),
            ("[]", "[]"),
        ];
        for (input, want) in cases {
            assert_eq!(compact_json(input), want.as_bytes());
            // the output is still the same JSON value
            let a: Value = serde_json::from_str(input).unwrap();
            let b: Value = serde_json::from_str(want).unwrap();
            assert_eq!(a, b);
        }
    }
}

#[cfg(test)]
mod properties;

//! `message_format = "cloudevents"`: CloudEvents 1.0 in binary content mode.
//!
//! The body stays the row's payload. The event's attributes go into the
//! message's headers with the `cloudEvents_` prefix the CloudEvents AMQP
//! binding uses for application properties; `datacontenttype` is the
//! message's `content_type` property, as that binding maps it (and the
//! plain format already sets it to `application/json`).
//!
//! | attribute | value |
//! |---|---|
//! | `specversion` | `1.0` |
//! | `id` | the row's dedup key (also `message_id`) |
//! | `source` | `cloudevents_source` (default `/outboxd/<source name>`) |
//! | `type` | the row's event type |
//! | `time` | the row's `created_at`, RFC 3339 in UTC, microseconds |
//! | `subject` | the row's aggregate id |
//! | `traceparent`, `tracestate` | copied from the row's headers when present (the Distributed Tracing extension) |

use std::time::SystemTime;

use lapin::types::{AMQPValue, FieldTable, LongString};

/// The CloudEvents spec version every message declares.
pub const SPEC_VERSION: &str = "1.0";
/// The binding's prefix for attributes carried as application properties.
pub const PREFIX: &str = "cloudEvents_";
/// Row headers that are also CloudEvents extension attributes (W3C trace
/// context, the spec's Distributed Tracing extension).
const TRACING: [&str; 2] = ["traceparent", "tracestate"];

/// One event's attributes, borrowed from its row.
pub struct Attributes<'a> {
    pub id: &'a str,
    pub source: &'a str,
    pub event_type: &'a str,
    pub time: SystemTime,
    pub subject: &'a str,
}

/// Adds the `cloudEvents_*` headers. Set after the row's own headers, so a
/// row cannot forge an attribute.
pub fn add(headers: &mut FieldTable, a: &Attributes<'_>) {
    let mut set = |name: &str, value: &str| {
        headers.insert(
            format!("{PREFIX}{name}").into(),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    };
    set("specversion", SPEC_VERSION);
    set("id", a.id);
    set("source", a.source);
    set("type", a.event_type);
    set(
        "time",
        &humantime::format_rfc3339_micros(a.time).to_string(),
    );
    // `subject` must be non-empty when present.
    if !a.subject.is_empty() {
        set("subject", a.subject);
    }
    for name in TRACING {
        let value = match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => Some(s.clone()),
            _ => None,
        };
        if let Some(value) = value {
            headers.insert(
                format!("{PREFIX}{name}").into(),
                AMQPValue::LongString(value),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use lapin::types::ShortString;

    use super::*;
    use crate::config::MessageFormat;
    use crate::message::{OutboxRow, Routing};
    use crate::template::Template;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn row(headers: &str) -> OutboxRow {
        OutboxRow {
            id: 7,
            aggregate_type: "order".into(),
            aggregate_id: "o-42".into(),
            event_type: "OrderPlaced".into(),
            payload: r#"{"total": 5}"#.into(),
            headers: headers.into(),
            dedup_key: "k-1".into(),
            exchange: None,
            routing_key: None,
            created_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            attempts: 0,
            undecodable: None,
        }
    }

    fn headers(row: &OutboxRow, format: &MessageFormat) -> FieldTable {
        let t = Template::parse("{aggregate_type}").expect("a valid template");
        let r = Routing {
            source: "orders",
            exchange: "e",
            routing_key: &t,
            max_body: 1 << 20,
            format,
        };
        let m = row.to_outbound(&r).expect("a good row");
        m.properties.headers().clone().unwrap_or_default()
    }

    fn text(h: &FieldTable, key: &str) -> Option<String> {
        match h.inner().get(&ShortString::from(key)) {
            Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
            _ => None,
        }
    }

    /// The CloudEvents 1.0 rules a binary-mode message must meet, written
    /// from the spec: the four required attributes present and non-empty,
    /// `specversion` 1.0, `time` an RFC 3339 timestamp, `subject` non-empty
    /// when present, and attribute names of lower-case letters and digits.
    fn conforms(h: &FieldTable) -> Result<(), String> {
        for required in ["specversion", "id", "source", "type"] {
            match text(h, &format!("{PREFIX}{required}")) {
                Some(v) if !v.is_empty() => {}
                _ => return Err(format!("required attribute {required} missing or empty")),
            }
        }
        if text(h, "cloudEvents_specversion").as_deref() != Some("1.0") {
            return Err("specversion is not 1.0".into());
        }
        if let Some(time) = text(h, "cloudEvents_time") {
            humantime::parse_rfc3339(&time).map_err(|e| format!("time {time:?}: {e}"))?;
        }
        if text(h, "cloudEvents_subject").is_some_and(|s| s.is_empty()) {
            return Err("subject is empty".into());
        }
        for key in h.inner().keys() {
            if let Some(name) = key.as_str().strip_prefix(PREFIX) {
                let ok = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if !ok {
                    return Err(format!("attribute name {name:?}"));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_row_becomes_a_conforming_binary_mode_event() {
        let format = MessageFormat::CloudEvents {
            source: "/shop/orders".into(),
        };
        let h = headers(&row("{}"), &format);
        assert_eq!(conforms(&h), Ok(()));
        // each attribute comes from the documented column
        assert_eq!(text(&h, "cloudEvents_id").as_deref(), Some("k-1"));
        assert_eq!(
            text(&h, "cloudEvents_source").as_deref(),
            Some("/shop/orders")
        );
        assert_eq!(text(&h, "cloudEvents_type").as_deref(), Some("OrderPlaced"));
        assert_eq!(text(&h, "cloudEvents_subject").as_deref(), Some("o-42"));
        assert_eq!(
            text(&h, "cloudEvents_time").as_deref(),
            Some("2023-11-14T22:13:20.123456Z")
        );
        // the plain headers stay, so consumers can move over one at a time
        assert_eq!(text(&h, "x-aggregate-id").as_deref(), Some("o-42"));
    }

    #[test]
    fn the_plain_format_adds_no_attributes() {
        let h = headers(&row("{}"), &MessageFormat::Plain);
        assert!(
            h.inner().keys().all(|k| !k.as_str().starts_with(PREFIX)),
            "{h:?}"
        );
    }

    #[test]
    fn trace_context_stays_as_given_and_becomes_the_tracing_extension() {
        let headers_json = format!(r#"{{"traceparent": "{TRACEPARENT}", "tracestate": "shop=1"}}"#);
        for format in [
            MessageFormat::Plain,
            MessageFormat::CloudEvents {
                source: "/s".into(),
            },
        ] {
            let h = headers(&row(&headers_json), &format);
            assert_eq!(text(&h, "traceparent").as_deref(), Some(TRACEPARENT));
            assert_eq!(text(&h, "tracestate").as_deref(), Some("shop=1"));
            let ce = matches!(format, MessageFormat::CloudEvents { .. });
            assert_eq!(
                text(&h, "cloudEvents_traceparent"),
                ce.then(|| TRACEPARENT.to_owned())
            );
        }
    }

    #[test]
    fn a_row_cannot_forge_an_attribute() {
        let format = MessageFormat::CloudEvents {
            source: "/s".into(),
        };
        let h = headers(
            &row(r#"{"cloudEvents_id": "forged", "cloudEvents_source": "/evil"}"#),
            &format,
        );
        assert_eq!(text(&h, "cloudEvents_id").as_deref(), Some("k-1"));
        assert_eq!(text(&h, "cloudEvents_source").as_deref(), Some("/s"));
    }

    #[test]
    fn an_empty_aggregate_id_leaves_subject_out() {
        let format = MessageFormat::CloudEvents {
            source: "/s".into(),
        };
        let mut r = row("{}");
        r.aggregate_id.clear();
        let h = headers(&r, &format);
        assert_eq!(text(&h, "cloudEvents_subject"), None);
        assert_eq!(conforms(&h), Ok(()));
    }
}

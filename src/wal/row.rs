//! What comes out of the log, as the [`OutboxRow`] a polled row would be:
//! an inserted outbox row (columns by name, in PostgreSQL's text format),
//! or an `outbox_emit()` message (its JSON envelope).
//!
//! A value that cannot be read never fails the stream: the row becomes a
//! bad row (`undecodable`, parked with the reason), like a polled one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::decode::Inserted;
use super::stream::lsn_text;
use crate::message::OutboxRow;

/// The prefix `outbox_emit()` gives its messages.
pub const MESSAGE_PREFIX: &str = "outboxd";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A commit timestamp from the stream (microseconds since 2000-01-01).
pub fn pg_time(micros: i64) -> SystemTime {
    let unix = micros.saturating_add(PG_EPOCH_MICROS);
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_micros(unix as u64)
    } else {
        UNIX_EPOCH
    }
}

/// An inserted outbox row. `commit_time` stands in for a `created_at` that
/// cannot be read.
pub fn from_insert(row: &Inserted, commit_time: SystemTime) -> OutboxRow {
    let mut problem: Option<String> = None;
    let mut text = |name: &str, required: bool| -> Option<String> {
        match row.get(name) {
            Some(Some(v)) => Some(v.clone()),
            Some(None) => {
                if required && problem.is_none() {
                    problem = Some(format!("column {name} is NULL"));
                }
                None
            }
            None => {
                if required && problem.is_none() {
                    problem = Some(format!("the outbox table has no column {name}"));
                }
                None
            }
        }
    };
    let id_text = text("id", true);
    let mut bad_id = None;
    let id = match &id_text {
        Some(v) => v.parse::<i64>().unwrap_or_else(|_| {
            bad_id = Some(format!("column id is not a bigint: {v:?}"));
            0
        }),
        None => 0,
    };
    let aggregate_type = text("aggregate_type", true).unwrap_or_default();
    let aggregate_id = text("aggregate_id", true).unwrap_or_default();
    let event_type = text("event_type", true).unwrap_or_default();
    let payload = text("payload", true).unwrap_or_default();
    let headers = text("headers", false).unwrap_or_default();
    let dedup_key = text("dedup_key", true).unwrap_or_default();
    let exchange = text("exchange", false);
    let routing_key = text("routing_key", false);
    let created_at = text("created_at", false);
    let attempts = text("attempts", false);
    if let Some(bad) = bad_id {
        // The id comes first: it names the row in every log line.
        problem = Some(bad);
    }
    let created_at = created_at
        .as_deref()
        .and_then(parse_timestamptz)
        .unwrap_or(commit_time);
    OutboxRow {
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        headers,
        dedup_key,
        exchange,
        routing_key,
        created_at,
        attempts: attempts.and_then(|a| a.parse().ok()).unwrap_or(0),
        undecodable: problem,
    }
}

/// An `outbox_emit()` message: its JSON envelope. Without a dedup key,
/// `message_id` is `<commit lsn>-<ordinal>`, the same on every
/// redelivery of the transaction. `id` is 0: there is no row.
pub fn from_message(
    content: &[u8],
    commit_lsn: u64,
    ordinal: u32,
    commit_time: SystemTime,
) -> OutboxRow {
    let derived = format!("{}-{ordinal}", lsn_text(commit_lsn));
    let mut row = OutboxRow {
        id: 0,
        aggregate_type: String::new(),
        aggregate_id: String::new(),
        event_type: String::new(),
        payload: String::new(),
        headers: String::new(),
        dedup_key: derived,
        exchange: None,
        routing_key: None,
        created_at: commit_time,
        attempts: 0,
        undecodable: None,
    };
    let envelope: Value = match serde_json::from_slice(content) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(other) => {
            row.undecodable = Some(format!(
                "the message is JSON but not an object: {other:.60}"
            ));
            return row;
        }
        Err(e) => {
            row.undecodable = Some(format!("the message is not JSON: {e}"));
            return row;
        }
    };
    let string = |key: &str| envelope.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut missing = Vec::new();
    for (key, slot) in [
        ("aggregate_type", &mut row.aggregate_type),
        ("aggregate_id", &mut row.aggregate_id),
        ("event_type", &mut row.event_type),
    ] {
        match string(key) {
            Some(v) => *slot = v,
            None => missing.push(key),
        }
    }
    match envelope.get("payload") {
        Some(Value::Null) | None => missing.push("payload"),
        Some(p) => row.payload = p.to_string(),
    }
    if let Some(h) = envelope.get("headers") {
        row.headers = h.to_string();
    }
    if let Some(key) = string("dedup_key") {
        row.dedup_key = key;
    }
    row.exchange = string("exchange");
    row.routing_key = string("routing_key");
    if !missing.is_empty() {
        row.undecodable = Some(format!("the message has no {}", missing.join(", ")));
    }
    row
}

/// `2026-12-06 06:24:35.123456+00` (DateStyle ISO; any offset): what
/// PostgreSQL prints for a timestamptz in the stream's session.
pub fn parse_timestamptz(text: &str) -> Option<SystemTime> {
    let (date, rest) = text.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    // the offset starts at the last + or - (the time has none)
    let split = rest.rfind(['+', '-'])?;
    let (time, offset) = rest.split_at(split);
    let mut t = time.splitn(3, ':');
    let hour: i64 = t.next()?.parse().ok()?;
    let minute: i64 = t.next()?.parse().ok()?;
    let seconds = t.next()?;
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    let second: i64 = whole.parse().ok()?;
    let micros: i64 = if fraction.is_empty() {
        0
    } else {
        if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{fraction:0<6}").parse().ok()?
    };
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut o = offset[1..].splitn(3, ':');
    let oh: i64 = o.next()?.parse().ok()?;
    let om: i64 = o.next().map_or(Some(0), |m| m.parse().ok())?;
    let os: i64 = o.next().map_or(Some(0), |s| s.parse().ok())?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 24
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + hour * 3600 + minute * 60 + second;
    let utc = local - sign * (oh * 3600 + om * 60 + os);
    let total = utc.checked_mul(1_000_000)?.checked_add(micros)?;
    if total < 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_micros(total as u64))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// well-known civil-date arithmetic).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t: SystemTime) -> f64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
    }

    #[test]
    fn timestamps_in_iso_with_offsets() {
        // date -u -d '2026-12-06 06:24:35' +%s = 1796538275
        let t = parse_timestamptz("2026-12-06 06:24:35.123456+00").unwrap();
        assert!(
            (secs(t) - 1_796_538_275.123_456).abs() < 1e-6,
            "{}",
            secs(t)
        );
        let t = parse_timestamptz("2026-12-06 06:24:35+00").unwrap();
        assert_eq!(secs(t), 1_796_538_275.0);
        let t = parse_timestamptz("2026-12-06 12:24:35.5+06").unwrap();
        assert_eq!(secs(t), 1_796_538_275.5);
        let t = parse_timestamptz("2026-12-06 00:54:35-05:30").unwrap();
        assert_eq!(secs(t), 1_796_538_275.0);
        let t = parse_timestamptz("2000-02-29 00:00:00+00").unwrap();
        assert_eq!(secs(t), 951_782_400.0);
        assert_eq!(
            parse_timestamptz("1970-01-01 00:00:00+00"),
            Some(UNIX_EPOCH)
        );
        for bad in [
            "",
            "infinity",
            "2026-13-01 00:00:00+00",
            "2026-12-06T06:24:35+00",
            "2026-12-06 06:24:35.1234567+00",
            "2026-12-06 06:24+00",
            "1969-12-31 23:59:59+00",
        ] {
            assert_eq!(parse_timestamptz(bad), None, "{bad}");
        }
    }

    #[test]
    fn pg_epoch() {
        assert_eq!(secs(pg_time(0)), 946_684_800.0);
        assert_eq!(pg_time(i64::MIN), UNIX_EPOCH);
    }

    fn inserted(cols: &[(&str, Option<&str>)]) -> Inserted {
        Inserted {
            schema: "public".into(),
            table: "outbox".into(),
            columns: cols
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.map(str::to_owned)))
                .collect(),
        }
    }

    #[test]
    fn an_inserted_row_by_column_name() {
        let row = from_insert(
            &inserted(&[
                ("id", Some("42")),
                ("aggregate_type", Some("order")),
                ("aggregate_id", Some("7")),
                ("event_type", Some("Placed")),
                ("payload", Some(r#"{"a": 1}"#)),
                ("headers", Some("{}")),
                ("dedup_key", Some("k-1")),
                ("exchange", None),
                ("routing_key", Some("r")),
                ("created_at", Some("2026-12-06 06:24:35+00")),
                ("attempts", Some("0")),
                ("held", Some("f")),
            ]),
            UNIX_EPOCH,
        );
        assert_eq!(row.undecodable, None);
        assert_eq!(row.id, 42);
        assert_eq!(row.aggregate(), ("order", "7"));
        assert_eq!(row.dedup_key, "k-1");
        assert_eq!(row.exchange, None);
        assert_eq!(row.routing_key.as_deref(), Some("r"));
        assert_eq!(secs(row.created_at), 1_796_538_275.0);
    }

    #[test]
    fn an_unreadable_row_is_a_bad_row_naming_the_column() {
        let row = from_insert(
            &inserted(&[("id", Some("x")), ("aggregate_type", Some("o"))]),
            UNIX_EPOCH,
        );
        assert_eq!(
            row.undecodable.as_deref(),
            Some("column id is not a bigint: \"x\"")
        );
        let row = from_insert(
            &inserted(&[("id", Some("1")), ("aggregate_type", None)]),
            UNIX_EPOCH,
        );
        assert_eq!(
            row.undecodable.as_deref(),
            Some("column aggregate_type is NULL")
        );
    }

    #[test]
    fn a_message_envelope() {
        let body = br#"{"aggregate_type":"order","aggregate_id":"7","event_type":"Placed","payload":{"a":1},"headers":{"h":"v"},"dedup_key":null}"#;
        let row = from_message(body, 0x1_0000_00FF, 3, UNIX_EPOCH);
        assert_eq!(row.undecodable, None);
        assert_eq!(row.dedup_key, "1/FF-3");
        assert_eq!(row.payload, r#"{"a":1}"#);
        assert_eq!(row.headers, r#"{"h":"v"}"#);
        assert_eq!(row.aggregate(), ("order", "7"));
        let keyed = br#"{"aggregate_type":"o","aggregate_id":"1","event_type":"E","payload":[],"dedup_key":"mine"}"#;
        assert_eq!(from_message(keyed, 1, 0, UNIX_EPOCH).dedup_key, "mine");
        let bad = from_message(br#"{"aggregate_type":"o"}"#, 1, 0, UNIX_EPOCH);
        assert_eq!(
            bad.undecodable.as_deref(),
            Some("the message has no aggregate_id, event_type, payload")
        );
        assert!(
            from_message(b"nope", 1, 0, UNIX_EPOCH)
                .undecodable
                .is_some()
        );
        assert!(from_message(b"[1]", 1, 0, UNIX_EPOCH).undecodable.is_some());
    }
}

//! `outboxd status` for people: one line per source, then a line per relay
//! (and the slot, for `capture = "wal"`), or the error that kept the
//! source from being read.

use std::fmt::Write as _;

use super::{RelayStatus, SlotStatus, SourceStatus};

/// The whole table.
pub fn table(sources: &[SourceStatus]) -> String {
    let width = sources
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("SOURCE".len());
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{:<width$}  {:<7}  {:<6}  {:>9}  {:>10}  {:>7}  {:>6}  {:>6}",
        "SOURCE", "CAPTURE", "PAUSED", "BACKLOG", "OLDEST", "HELD", "DEAD", "RELAYS"
    );
    for s in sources {
        let number = |n: Option<i64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let paused = match (&s.error, s.paused) {
            (Some(_), _) => "-",
            (None, Some(true)) => "yes",
            (None, Some(false)) => "no",
            (None, None) => "n/a",
        };
        let relays = if s.error.is_some() {
            "-".to_owned()
        } else {
            s.relays.len().to_string()
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {:<6}  {:>9}  {:>10}  {:>7}  {:>6}  {:>6}",
            s.name,
            s.capture,
            paused,
            number(s.backlog),
            s.oldest_pending_age_seconds
                .map_or_else(|| "-".to_owned(), age),
            number(s.held),
            number(s.dead_letters),
            relays,
        );
        if let Some(error) = &s.error {
            let _ = writeln!(out, "  error: {error}");
            continue;
        }
        match (s.paused, &s.paused_since) {
            (Some(true), Some(since)) => {
                let _ = writeln!(out, "  paused since {since} (`outboxd resume` to go on)");
            }
            (None, _) => {
                let _ = writeln!(
                    out,
                    "  no pause flag on {} (run `outboxd migrate` to add it)",
                    s.table
                );
            }
            _ => {}
        }
        for r in &s.relays {
            let _ = writeln!(out, "  {}", relay_line(r, s.ordering != "none"));
        }
        if let Some(slot) = &s.slot {
            let _ = writeln!(out, "  {}", slot_line(slot));
        }
    }
    out
}

fn relay_line(r: &RelayStatus, ordered: bool) -> String {
    let mut line = format!("relay pid {} ({}", r.pid, r.application_name);
    if let Some(client) = &r.client {
        let _ = write!(line, ", {client}");
    }
    if let Some(since) = &r.since {
        let _ = write!(line, ", since {since}");
    }
    line.push(')');
    if ordered {
        let _ = write!(
            line,
            ": {} partition(s) {}",
            r.partitions.len(),
            ranges(&r.partitions)
        );
    }
    line
}

fn slot_line(slot: &SlotStatus) -> String {
    if !slot.exists {
        return format!("slot {}: missing (`outboxd migrate` makes it)", slot.name);
    }
    let state = match slot.active_pid {
        Some(pid) if slot.active => format!("active (pid {pid})"),
        _ => "inactive".to_owned(),
    };
    format!(
        "slot {}: {state}, wal_status {}, retains {}",
        slot.name,
        slot.wal_status.as_deref().unwrap_or("unknown"),
        slot.retained_bytes.map_or_else(|| "-".to_owned(), bytes)
    )
}

/// Sorted partition numbers as ranges: `0-3,7,9-10`; `-` for none.
pub fn ranges(partitions: &[i32]) -> String {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(",")
    }
}

/// An age in seconds, in the largest unit that keeps it readable.
pub fn age(seconds: f64) -> String {
    match seconds {
        s if s < 60.0 => format!("{s:.1}s"),
        s if s < 3600.0 => format!("{:.1}m", s / 60.0),
        s if s < 86400.0 => format!("{:.1}h", s / 3600.0),
        s => format!("{:.1}d", s / 86400.0),
    }
}

/// Bytes in binary units.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_print_as_ranges() {
        for (partitions, expected) in [
            // none owned
            (vec![], "-"),
            // one alone
            (vec![5], "5"),
            // a run and a lone one
            (vec![0, 1, 2, 3, 7], "0-3,7"),
            // unsorted and repeated input
            (vec![10, 9, 9, 1], "1,9-10"),
            // the whole key space
            ((0..64).collect(), "0-63"),
        ] {
            assert_eq!(ranges(&partitions), expected, "{partitions:?}");
        }
    }

    #[test]
    fn ages_and_sizes_pick_a_readable_unit() {
        for (seconds, expected) in [
            // under a minute: seconds with a decimal
            (0.0, "0.0s"),
            (3.25, "3.2s"),
            // minutes, hours, days
            (90.0, "1.5m"),
            (5400.0, "1.5h"),
            (172800.0, "2.0d"),
        ] {
            assert_eq!(age(seconds), expected, "{seconds}");
        }
        for (n, expected) in [
            // small: whole bytes
            (0, "0 B"),
            (1023, "1023 B"),
            // binary units
            (1536, "1.5 KiB"),
            (16 * 1024 * 1024, "16.0 MiB"),
        ] {
            assert_eq!(bytes(n), expected, "{n}");
        }
    }

    fn source(name: &str) -> SourceStatus {
        SourceStatus {
            name: name.into(),
            table: "public.outbox".into(),
            capture: "poll",
            ordering: "aggregate",
            error: None,
            paused: Some(false),
            paused_since: None,
            backlog: Some(12),
            oldest_pending_age_seconds: Some(3.0),
            held: Some(2),
            dead_letters: Some(1),
            relays: vec![RelayStatus {
                pid: 4242,
                application_name: "outboxd".into(),
                client: Some("127.0.0.1:5000".into()),
                since: None,
                partitions: (0..32).collect(),
            }],
            slot: None,
        }
    }

    #[test]
    fn the_table_has_a_line_per_source_and_per_relay_and_shows_errors() {
        let mut broken = source("billing");
        broken.error = Some("cannot connect to db: refused".into());
        let mut paused = source("orders");
        paused.paused = Some(true);
        paused.paused_since = Some("2024-01-01T00:00:00+00:00".into());
        let text = table(&[paused, broken]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SOURCE"), "{text}");
        assert!(
            lines[1].starts_with("orders") && lines[1].contains(" yes ") && lines[1].contains("12"),
            "{text}"
        );
        assert!(lines[2].contains("paused since 2024-01-01"), "{text}");
        assert!(
            lines[3].contains("relay pid 4242") && lines[3].contains("32 partition(s) 0-31"),
            "{text}"
        );
        assert!(lines[4].starts_with("billing"), "{text}");
        assert!(lines[5].contains("error: cannot connect"), "{text}");
    }
}

//! `capture`, `slot` and `publication`: defaults, names, and the keys that
//! mean nothing with the log.

use super::*;
use crate::config::{CaptureMode, WalCapture, default_wal_name};

fn capture_of(text: &str) -> CaptureMode {
    load(text).expect("valid").sources[0].capture.clone()
}

#[test]
fn polling_is_the_default() {
    assert_eq!(capture_of(MINIMAL), CaptureMode::Poll);
    assert_eq!(
        capture_of(&with_source_line("capture = \"poll\"")),
        CaptureMode::Poll
    );
}

#[test]
fn wal_names_default_from_the_source_name() {
    assert_eq!(
        capture_of(&with_source_line("capture = \"wal\"")),
        CaptureMode::Wal(WalCapture {
            slot: "outboxd_orders".into(),
            publication: "outboxd_orders".into(),
        })
    );
    assert_eq!(default_wal_name("Billing-EU.v2"), "outboxd_billing_eu_v2");
    let set = capture_of(&with_source_line(
        "capture = \"wal\"\nslot = \"s_1\"\npublication = \"Pub One\"",
    ));
    assert_eq!(
        set,
        CaptureMode::Wal(WalCapture {
            slot: "s_1".into(),
            publication: "Pub One".into(),
        })
    );
}

#[test]
fn wal_mistakes_name_their_key() {
    let cases: [(&str, &[&str]); 6] = [
        (
            "capture = \"cdc\"",
            &["source[0].capture", "\"poll\" or \"wal\"", "\"cdc\""],
        ),
        (
            "slot = \"s\"",
            &["source[0].slot", "only applies with capture = \"wal\""],
        ),
        (
            "publication = \"p\"",
            &["source[0].publication", "only applies with capture"],
        ),
        (
            "capture = \"wal\"\nslot = \"Bad-Slot\"",
            &["source[0].slot", "lower-case ASCII letters, digits and `_`"],
        ),
        (
            "capture = \"wal\"\nordering = \"none\"",
            &["source[0].ordering", "commit order"],
        ),
        (
            "capture = \"wal\"\non_park = \"hold\"",
            &["source[0].on_park", "does not hold back its aggregate"],
        ),
    ];
    for (line, wanted) in cases {
        let message = err(&with_source_line(line));
        for w in wanted {
            assert!(message.contains(w), "{line}: {w:?} not in {message}");
        }
    }
    let long = format!("capture = \"wal\"\nslot = \"{}\"", "s".repeat(64));
    assert!(err(&with_source_line(&long)).contains("1 to 63 characters"));
}

#[test]
fn batch_size_defaults_by_capture_and_a_set_one_wins_in_both() {
    let batch = |text: &str| load(text).expect("valid").sources[0].batch_size;
    assert_eq!(batch(MINIMAL), DEFAULT_BATCH_SIZE as usize);
    assert_eq!(
        batch(&with_source_line("capture = \"wal\"")),
        DEFAULT_WAL_BATCH_SIZE as usize
    );
    assert_ne!(DEFAULT_BATCH_SIZE, DEFAULT_WAL_BATCH_SIZE);
    for capture in ["poll", "wal"] {
        assert_eq!(
            batch(&with_source_line(&format!(
                "capture = \"{capture}\"\nbatch_size = 300"
            ))),
            300,
            "{capture}"
        );
    }
    let e = load(&with_source_line("capture = \"wal\"\nbatch_size = 0")).unwrap_err();
    assert!(e.to_string().contains("source[0].batch_size"), "{e}");
}

//! `message_format` and `cloudevents_source`.

use super::*;
use crate::config::MessageFormat;

fn format_of(text: &str) -> MessageFormat {
    load(text).expect("valid").sources[0].format.clone()
}

#[test]
fn plain_is_the_default_and_cloudevents_names_the_source() {
    // no key: outboxd's own layout
    assert_eq!(format_of(MINIMAL), MessageFormat::Plain);
    // cloudevents without a source: /outboxd/<source name>
    assert_eq!(
        format_of(&with_source_line("message_format = \"cloudevents\"")),
        MessageFormat::CloudEvents {
            source: "/outboxd/orders".into()
        }
    );
    // a source given is kept as written
    assert_eq!(
        format_of(&with_source_line(
            "message_format = \"cloudevents\"\ncloudevents_source = \"https://shop.example.com/orders\""
        )),
        MessageFormat::CloudEvents {
            source: "https://shop.example.com/orders".into()
        }
    );
}

#[test]
fn format_mistakes_name_their_key() {
    let cases: [(&str, &[&str]); 4] = [
        // an unknown format
        (
            "message_format = \"ce\"",
            &[
                "source[0].message_format",
                "\"plain\" or \"cloudevents\"",
                "\"ce\"",
            ],
        ),
        // a source without the format it belongs to
        (
            "cloudevents_source = \"/x\"",
            &[
                "source[0].cloudevents_source",
                "only applies with message_format",
            ],
        ),
        // not a URI-reference
        (
            "message_format = \"cloudevents\"\ncloudevents_source = \"shop orders\"",
            &["source[0].cloudevents_source", "not a URI-reference"],
        ),
        // empty: CloudEvents requires a source
        (
            "message_format = \"cloudevents\"\ncloudevents_source = \"\"",
            &["source[0].cloudevents_source", "must not be empty"],
        ),
    ];
    for (line, wanted) in cases {
        let message = err(&with_source_line(line));
        for w in wanted {
            assert!(message.contains(w), "{line}: {w:?} not in {message}");
        }
    }
}

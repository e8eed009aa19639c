//! `message_format` and `cloudevents_source`: how a row's metadata is laid
//! out on the AMQP message.

use super::{Invalid, Validator};

/// How a row's metadata travels on the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageFormat {
    /// outboxd's own layout: `message_id`, `type`, `timestamp` and the
    /// `x-outbox-*` / `x-aggregate-*` headers (the default).
    Plain,
    /// CloudEvents 1.0 in binary content mode: the same message, plus the
    /// event's attributes as `cloudEvents_*` headers (the prefix of the
    /// CloudEvents AMQP binding) and `content_type` as `datacontenttype`.
    CloudEvents {
        /// The `source` attribute: a URI-reference naming the producer.
        source: String,
    },
}

/// `/outboxd/<source name>`: the default `source` attribute, a relative
/// URI-reference, as the CloudEvents spec allows.
pub fn default_cloudevents_source(name: &str) -> String {
    let mut out = String::from("/outboxd/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The CloudEvents `source` attribute must be a non-empty URI-reference
/// (RFC 3986): no spaces, no control characters, nothing outside ASCII
/// (percent-encode it), and at most what an AMQP header sensibly holds.
pub fn check_cloudevents_source(s: &str) -> Result<(), Invalid> {
    const MAX: usize = 2048;
    let bad = s.chars().find(|c| {
        !c.is_ascii()
            || c.is_ascii_control()
            || matches!(
                c,
                ' ' | '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}'
            )
    });
    if s.is_empty() {
        Err(Invalid::new(
            "must not be empty: CloudEvents requires a source (a URI-reference such as \"https://shop.example.com/orders\" or \"/shop/orders\")",
        ))
    } else if s.len() > MAX {
        Err(Invalid::new(format!("is {} bytes; at most {MAX}", s.len())))
    } else if let Some(c) = bad {
        Err(Invalid::new(format!(
            "{s:?} is not a URI-reference: {c:?} is not allowed (percent-encode it)"
        )))
    } else {
        Ok(())
    }
}

impl Validator<'_> {
    /// `message_format` and `cloudevents_source` of one source.
    pub(super) fn message_format(
        &mut self,
        k: &dyn Fn(&str) -> String,
        name: Option<&str>,
        format: Option<String>,
        source: Option<String>,
    ) -> Option<MessageFormat> {
        let format = self.string_opt(&k("message_format"), format);
        let source = self.string_opt(&k("cloudevents_source"), source);
        match format.as_deref() {
            None | Some("plain") => {
                if source.is_some() {
                    self.invalid(
                        &k("cloudevents_source"),
                        "only applies with message_format = \"cloudevents\"",
                    );
                }
                Some(MessageFormat::Plain)
            }
            Some("cloudevents") => {
                let source = source.or_else(|| name.map(default_cloudevents_source))?;
                self.check(&k("cloudevents_source"), check_cloudevents_source(&source))?;
                Some(MessageFormat::CloudEvents { source })
            }
            Some(other) => {
                self.invalid(
                    &k("message_format"),
                    format!("must be \"plain\" or \"cloudevents\", got {other:?}"),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_source_is_a_percent_encoded_path() {
        // plain names stay readable
        assert_eq!(default_cloudevents_source("orders"), "/outboxd/orders");
        // anything outside the unreserved set is percent-encoded, byte by byte
        assert_eq!(
            default_cloudevents_source("a b/ü"),
            "/outboxd/a%20b%2F%C3%BC"
        );
        // and the result always passes the check
        assert!(check_cloudevents_source(&default_cloudevents_source("a b/ü\n")).is_ok());
    }

    #[test]
    fn sources_that_are_not_uri_references_are_refused() {
        let cases = [
            // absolute URIs, paths and URNs are all URI-references
            ("https://shop.example.com/orders", true),
            ("/shop/orders", true),
            ("urn:shop:orders", true),
            // empty: the attribute is required and non-empty
            ("", false),
            // a space, a control character and non-ASCII must be encoded
            ("/shop orders", false),
            ("/shop\torders", false),
            ("/café", false),
            // characters RFC 3986 never allows unencoded
            ("/a{b}", false),
        ];
        for (source, ok) in cases {
            assert_eq!(check_cloudevents_source(source).is_ok(), ok, "{source:?}");
        }
    }
}

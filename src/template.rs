//! Routing-key templates such as `{aggregate_type}.{event_type}`.
//!
//! A template is parsed once when the config loads, so an unknown placeholder
//! is a config error at startup rather than a surprise on the first row.
//! Rendering is a single pass with no allocation beyond the output string.

use std::fmt;

/// A row field a template can refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    AggregateType,
    AggregateId,
    EventType,
    Source,
}

impl Field {
    const ALL: [(&'static str, Field); 4] = [
        ("aggregate_type", Field::AggregateType),
        ("aggregate_id", Field::AggregateId),
        ("event_type", Field::EventType),
        ("source", Field::Source),
    ];

    fn parse(name: &str) -> Option<Field> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    fn names() -> String {
        Self::ALL
            .iter()
            .map(|(n, _)| format!("{{{n}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// The values a template is rendered from.
pub struct Values<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    pub source: &'a str,
}

/// A parsed routing-key template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

/// Why a template did not parse; the message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown placeholder `{{{0}}}`; known placeholders are {known}", known = Field::names())]
    UnknownPlaceholder(String),
    #[error("unclosed `{{` at byte {0} (write `{{{{` for a literal brace)")]
    Unclosed(usize),
    #[error("unmatched `}}` at byte {0} (write `}}}}` for a literal brace)")]
    Unmatched(usize),
}

impl Template {
    pub fn parse(input: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let bytes = input.as_bytes();
        let mut i = 0;
        while i < input.len() {
            match bytes[i] {
                b'{' if bytes.get(i + 1) == Some(&b'{') => {
                    literal.push('{');
                    i += 2;
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    literal.push('}');
                    i += 2;
                }
                b'{' => {
                    let end = input[i + 1..].find('}').ok_or(TemplateError::Unclosed(i))? + i + 1;
                    let name = &input[i + 1..end];
                    let field = Field::parse(name)
                        .ok_or_else(|| TemplateError::UnknownPlaceholder(name.to_owned()))?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(field));
                    i = end + 1;
                }
                b'}' => return Err(TemplateError::Unmatched(i)),
                _ => {
                    // Copy the whole UTF-8 character, not just one byte.
                    let ch_len = input[i..].chars().next().map_or(1, char::len_utf8);
                    literal.push_str(&input[i..i + ch_len]);
                    i += ch_len;
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            parts,
            source: input.to_owned(),
        })
    }

    /// Bytes of fixed text: every key rendered from it is at least this long.
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(text) => text.len(),
                Part::Field(_) => 0,
            })
            .sum()
    }

    /// True when the template has no placeholders (its output never varies).
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    pub fn render(&self, v: &Values<'_>) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(s) => s,
                Part::Field(Field::AggregateType) => v.aggregate_type,
                Part::Field(Field::AggregateId) => v.aggregate_id,
                Part::Field(Field::EventType) => v.event_type,
                Part::Field(Field::Source) => v.source,
            });
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: Values<'static> = Values {
        aggregate_type: "order",
        aggregate_id: "o-42",
        event_type: "OrderCreated",
        source: "orders",
    };

    #[test]
    fn renders_placeholders_and_literals() {
        let cases = [
            // the documented default
            ("{aggregate_type}.{event_type}", "order.OrderCreated"),
            // every placeholder
            (
                "{source}/{aggregate_type}/{aggregate_id}/{event_type}",
                "orders/order/o-42/OrderCreated",
            ),
            // constant key
            ("fixed.key", "fixed.key"),
            // empty template renders empty
            ("", ""),
            // escaped braces
            ("{{{event_type}}}", "{OrderCreated}"),
            // non-ASCII literal text survives
            ("é.{event_type}.ü", "é.OrderCreated.ü"),
        ];
        for (tpl, want) in cases {
            assert_eq!(
                Template::parse(tpl).unwrap().render(&ROW),
                want,
                "template {tpl:?}"
            );
        }
    }

    #[test]
    fn rejects_bad_templates_with_a_reason() {
        let err = Template::parse("{aggregate}.{event_type}").unwrap_err();
        assert_eq!(err, TemplateError::UnknownPlaceholder("aggregate".into()));
        assert!(err.to_string().contains("{aggregate_type}"), "{err}");
        assert_eq!(
            Template::parse("a.{event_type").unwrap_err(),
            TemplateError::Unclosed(2)
        );
        assert_eq!(
            Template::parse("a}").unwrap_err(),
            TemplateError::Unmatched(1)
        );
        // an empty placeholder is unknown, not a panic
        assert!(matches!(
            Template::parse("{}"),
            Err(TemplateError::UnknownPlaceholder(_))
        ));
    }

    #[test]
    fn counts_its_fixed_text() {
        let cases = [
            // only a placeholder
            ("{event_type}", 0),
            // two literal bytes around two placeholders
            ("{aggregate_type}.{event_type}", 1),
            // escaped braces count once each
            ("{{x}}", 3),
            // multi-byte characters count in bytes, as AMQP does
            ("é.{source}", 3),
        ];
        for (tpl, want) in cases {
            assert_eq!(Template::parse(tpl).unwrap().literal_len(), want, "{tpl}");
        }
    }

    #[test]
    fn knows_when_it_is_constant() {
        assert!(Template::parse("a.b").unwrap().is_constant());
        assert!(!Template::parse("a.{source}").unwrap().is_constant());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Parsing any string either fails with a reason or yields a
        /// template that renders without panicking.
        #[test]
        fn any_template_parses_or_fails_cleanly(tpl in "\\PC{0,60}", v in "\\PC{0,20}") {
            if let Ok(t) = Template::parse(&tpl) {
                let _ = t.render(&Values { aggregate_type: &v, aggregate_id: &v, event_type: &v, source: &v });
            }
        }

        /// Text without braces is its own rendering.
        #[test]
        fn brace_free_text_renders_as_itself(text in "[^{}]{0,60}") {
            let t = Template::parse(&text).unwrap();
            let out = t.render(&Values { aggregate_type: "a", aggregate_id: "b", event_type: "c", source: "d" });
            prop_assert_eq!(out, text);
        }
    }
}

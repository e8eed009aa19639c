//! PostgreSQL identifiers taken from the config: validated, then always quoted.
//!
//! Table names come from a config file, not from rows, but they still never
//! reach SQL unquoted. Validation is deliberately stricter than PostgreSQL
//! (plain `[A-Za-z_][A-Za-z0-9_$]*`, at most 63 bytes) so that a typo or an
//! injection attempt is rejected with a clear message instead of silently
//! naming some other relation.

use std::fmt;

/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
pub const MAX_IDENT_BYTES: usize = 63;

/// A schema-qualified table name, e.g. `public.outbox`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    /// Parses `table` or `schema.table`; the schema defaults to `public`.
    /// Errors quote the whole value, not only the part that is wrong.
    pub fn parse(input: &str) -> Result<Self, TableNameError> {
        let (schema, table) = match input.split_once('.') {
            Some((_, table)) if table.contains('.') => {
                return Err(TableNameError::TooManyParts {
                    input: input.to_owned(),
                });
            }
            Some((schema, table)) => (schema, table),
            None => ("public", input),
        };
        let part = |part: &'static str| {
            move |source| TableNameError::Part {
                input: input.to_owned(),
                part,
                source,
            }
        };
        check_ident(schema).map_err(part("schema"))?;
        check_ident(table).map_err(part("table"))?;
        Ok(Self {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }

    /// `"schema"."table"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// A table beside this one (`_dead`, `_wakeup`), schema-qualified and
    /// quoted, safe to splice into SQL.
    pub fn sibling(&self, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.derived(suffix))
        )
    }

    /// A name derived from the table, e.g. `outbox_pending_idx`, cut to fit
    /// PostgreSQL's identifier length at a character boundary.
    pub fn derived(&self, suffix: &str) -> String {
        let budget = MAX_IDENT_BYTES.saturating_sub(suffix.len());
        let mut base = self.table.as_str();
        while base.len() > budget {
            let mut cut = budget.min(base.len());
            while !base.is_char_boundary(cut) {
                cut -= 1;
            }
            base = &base[..cut];
        }
        format!("{base}{suffix}")
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// What is wrong with one identifier (a schema or a table name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    #[error("name is empty")]
    Empty,
    #[error(
        "name {name:?} is {} bytes long; PostgreSQL allows {MAX_IDENT_BYTES}",
        name.len()
    )]
    TooLong { name: String },
    #[error(
        "name {name:?} may only contain ASCII letters, digits, `_` and `$`, and must not start with a digit"
    )]
    BadCharacters { name: String },
}

/// What is wrong with a table name; the message quotes the whole value,
/// not only the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableNameError {
    /// Neither `table` nor `schema.table`.
    #[error("{input:?} has more than one `.`; write `table` or `schema.table`")]
    TooManyParts { input: String },
    /// The schema or the table part is not a plain identifier.
    #[error("{input:?}: {part} {source}")]
    Part {
        input: String,
        /// `"schema"` or `"table"`.
        part: &'static str,
        #[source]
        source: IdentError,
    },
}

/// Checks one identifier part; the error says what is wrong with it.
pub fn check_ident(name: &str) -> Result<(), IdentError> {
    if name.is_empty() {
        return Err(IdentError::Empty);
    }
    if name.len() > MAX_IDENT_BYTES {
        return Err(IdentError::TooLong {
            name: name.to_owned(),
        });
    }
    let mut chars = name.chars();
    let first_ok = matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c == '_' || c == '$' || c.is_ascii_alphanumeric()) {
        return Err(IdentError::BadCharacters {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Quotes an identifier for SQL: `a"b` becomes `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL: `it's` becomes `'it''s'`.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_qualified_names() {
        let t = TableName::parse("outbox").unwrap();
        assert_eq!((t.schema.as_str(), t.table.as_str()), ("public", "outbox"));
        let t = TableName::parse("billing.events_v2").unwrap();
        assert_eq!(
            (t.schema.as_str(), t.table.as_str()),
            ("billing", "events_v2")
        );
        assert_eq!(t.quoted(), r#""billing"."events_v2""#);
    }

    #[test]
    fn rejects_names_that_are_not_plain_identifiers() {
        let cases = [
            // an injection attempt
            r#"outbox"; DROP TABLE x; --"#,
            // empty
            "",
            // empty table part
            "public.",
            // three parts
            "a.b.c",
            // starts with a digit
            "1outbox",
            // space
            "out box",
            // too long
            &"x".repeat(64),
        ];
        for case in cases {
            let err = TableName::parse(case).expect_err(case).to_string();
            // the message quotes the whole value, not just the bad part
            assert!(err.contains(&format!("{case:?}")), "{case:?}: {err}");
        }
        assert!(
            TableName::parse("a.b.c")
                .unwrap_err()
                .to_string()
                .contains("more than one `.`")
        );
    }

    #[test]
    fn a_bad_part_is_named_and_kept_as_the_cause() {
        let err = TableName::parse("public.").unwrap_err();
        assert_eq!(err.to_string(), r#""public.": table name is empty"#);
        assert!(matches!(
            err,
            TableNameError::Part {
                part: "table",
                source: IdentError::Empty,
                ..
            }
        ));
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("name is empty"));
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn derived_names_fit_in_an_identifier() {
        let t = TableName::parse(&"t".repeat(63)).unwrap();
        let d = t.derived("_pending_idx");
        assert_eq!(d.len(), MAX_IDENT_BYTES);
        assert!(d.ends_with("_pending_idx"));
        let t = TableName::parse("outbox").unwrap();
        assert_eq!(t.derived("_pending_idx"), "outbox_pending_idx");
    }
}

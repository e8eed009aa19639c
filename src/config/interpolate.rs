//! `${VAR}` substitution in config strings.
//!
//! Substitution happens after TOML parsing, on each string value, so a
//! variable holding quotes or newlines cannot change the structure of the
//! file. `${VAR:-default}` uses `default` when `VAR` is unset or empty (the
//! default cannot contain `}` or a `${`). `$${` is a literal `${`. A variable that is
//! not set and has no default is an error that names both the variable and
//! the config key it was found in.

use super::{ConfigError, Invalid};

/// Replaces every `${NAME}` in `input` with `lookup(NAME)`.
pub fn interpolate(
    input: &str,
    key: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    if !input.contains('$') {
        return Ok(input.to_owned());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            // `$${` is an escaped, literal `${`.
            out.push_str("${");
            rest = escaped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| ConfigError::Invalid {
                key: key.to_owned(),
                reason: Invalid::new("unclosed `${` (write `$${` for a literal `${`)"),
            })?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&body[..end], None),
            };
            if !is_var_name(name) {
                return Err(ConfigError::Invalid {
                    key: key.to_owned(),
                    reason: Invalid::new(format!(
                        "`${{{name}}}` is not a valid variable name (letters, digits and `_`, not starting with a digit)"
                    )),
                });
            }
            if default.is_some_and(|d| d.contains("${")) {
                return Err(ConfigError::Invalid {
                    key: key.to_owned(),
                    reason: Invalid::new(format!(
                        "nested `${{` in the default of `${{{name}:-…}}` is not supported; write the default literally"
                    )),
                });
            }
            let value = match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.to_owned(),
                (None, None) if lookup(name).is_some() => String::new(),
                (None, None) => {
                    return Err(ConfigError::MissingVariable {
                        key: key.to_owned(),
                        var: name.to_owned(),
                    });
                }
            };
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "USER" => Some("alice".into()),
            "EMPTY" => Some(String::new()),
            "QUOTE" => Some("a\"b".into()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_and_keeps_everything_else() {
        let cases = [
            // no dollar at all: returned as is
            ("plain", "plain"),
            // one variable in the middle
            ("postgres://${USER}@db/x", "postgres://alice@db/x"),
            // two variables, one of them empty
            ("${USER}${EMPTY}!", "alice!"),
            // a value with a quote stays a plain string value
            ("${QUOTE}", "a\"b"),
            // a lone dollar is literal
            ("cost $5", "cost $5"),
            // `$${` escapes a literal `${`
            ("$${USER}", "${USER}"),
            // trailing dollar
            ("x$", "x$"),
            // a default is used only when the variable is unset or empty
            ("${NOPE:-fallback}", "fallback"),
            ("${EMPTY:-fallback}", "fallback"),
            ("${USER:-fallback}", "alice"),
            // a default may hold URL punctuation
            ("${NOPE:-amqp://g:g@h:5672/%2f}", "amqp://g:g@h:5672/%2f"),
        ];
        for (input, want) in cases {
            assert_eq!(
                interpolate(input, "k", &env).unwrap(),
                want,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn missing_variable_names_the_variable_and_the_key() {
        let err = interpolate("x${NOPE}y", "source[0].database_url", &env).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("NOPE"), "{msg}");
        assert!(msg.contains("source[0].database_url"), "{msg}");
    }

    #[test]
    fn malformed_references_are_errors() {
        // unclosed brace
        assert!(interpolate("${USER", "k", &env).is_err());
        // empty name
        assert!(interpolate("${}", "k", &env).is_err());
        // name starting with a digit
        assert!(interpolate("${1A}", "k", &env).is_err());
        // spaces are not allowed in a name
        assert!(interpolate("${A B}", "k", &env).is_err());
        // a variable in a default is not supported, and says so (it used
        // to leave a literal `${V}` behind, then an unrelated parse error)
        let err = interpolate("${U:-${V}}", "k", &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nested `${`") && err.contains("`${U:-…}`"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any input either interpolates or fails with the key named.
        #[test]
        fn never_panics(input in "\\PC{0,80}") {
            match interpolate(&input, "some.key", &|n| (n.len() % 2 == 0).then(|| n.to_owned())) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.to_string().contains("some.key")),
            }
        }
    }
}

//! A TOML or serde error as we report it: where (line, column, and the key
//! when it can be told) and toml's message, never the text of the line.
//!
//! toml's own `Display` quotes the offending line with a caret under it.
//! That line is often `url = "amqp://user:password@…"`, so the password
//! ended up on stderr. serde's type errors also quote string values
//! (`invalid type: string "hunter2", expected i64`); those are cut out.

/// `line L, column C (key `a.b`): message`.
pub fn describe(text: &str, err: &toml::de::Error) -> String {
    let message = without_strings(err.message());
    let Some(span) = err.span() else {
        return message;
    };
    let offset = floor_char_boundary(text, span.start);
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[..offset].matches('\n').count() + 1;
    let column = text[line_start..offset].chars().count() + 1;
    match key_at(text, line_start) {
        Some(key) => format!("line {line}, column {column} (key `{key}`): {message}"),
        None => format!("line {line}, column {column}: {message}"),
    }
}

/// The largest char boundary at or before `i` (clamped to the text).
fn floor_char_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The dotted path of the key set on the line starting at `line_start`,
/// with its table (`source[1].batch_size`), if the line starts with a
/// plain key. Only plain key characters are ever returned: a line that
/// does not look like `key = …` yields nothing rather than a piece of it.
fn key_at(text: &str, line_start: usize) -> Option<String> {
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=')?.0.trim();
    if !is_plain_key(key) {
        return None;
    }
    let mut table = None;
    for header in text[..line_start].lines().rev() {
        let header = header.trim();
        if let Some(name) = header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
            let name = name.trim();
            if !is_plain_key(name) {
                return Some(key.to_owned());
            }
            let marker = format!("[[{name}]]");
            let index = text[..line_start]
                .lines()
                .filter(|l| l.trim().replace(' ', "") == marker)
                .count()
                .saturating_sub(1);
            table = Some(format!("{name}[{index}]"));
            break;
        }
        if let Some(name) = header.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            table = is_plain_key(name.trim()).then(|| name.trim().to_owned());
            break;
        }
    }
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// serde's messages with every quoted string value (`string "…"`, with
/// Rust escapes inside) replaced by `a string`.
fn without_strings(message: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(MARK) {
        out.push_str(&rest[..start]);
        out.push_str("a string");
        let mut chars = rest[start + MARK.len()..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(start + MARK.len() + i + 1);
                    break;
                }
                _ => {}
            }
        }
        // An unterminated quote: drop everything after it.
        rest = end.map_or("", |e| &rest[e..]);
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> String {
        let err = toml::from_str::<super::super::raw::RawConfig>(text)
            .map(|_| ())
            .unwrap_err();
        describe(text, &err)
    }

    #[test]
    fn errors_name_the_place_and_never_the_text() {
        let cases: [(&str, &str); 9] = [
            // junk after a value: the classic "password in the caret line"
            (
                "[rabbitmq]\nurl = \"amqp://guest:TomlLeak1@h\" x\n",
                "line 2, column 34 (key `rabbitmq.url`): unexpected key or value",
            ),
            // an unclosed quote
            (
                "[rabbitmq]\nurl = \"amqp://guest:TomlLeak1@h\n",
                "line 2, column 32 (key `rabbitmq.url`): invalid basic string",
            ),
            // a misspelled key: the key is named, its value is not
            (
                "[[source]]\ndatabse_url = \"postgres://root:TomlLeak1@h/d\"\n",
                "line 2, column 1 (key `source[0].databse_url`): unknown field `databse_url`",
            ),
            // a string where a number belongs: serde's quote of it is cut
            (
                "[[source]]\nname = \"a\"\n[[source]]\nbatch_size = \"TomlLeak1\"\n",
                "(key `source[1].batch_size`): invalid type: a string, expected i64",
            ),
            // escapes inside the quoted value do not end the cut early
            (
                "[[source]]\nbatch_size = \"Toml\\\"Leak1\"\n",
                "invalid type: a string, expected i64",
            ),
            // a line that is not `key = …`: no key, and nothing of the line
            (
                "[rabbitmq]\nTomlLeak1 x\n",
                "line 2, column 11: key with no value",
            ),
            // a key with spaces in it is not printed either
            (
                "[rabbitmq]\nTomlLeak1 x = 3\n",
                "line 2, column 11: key with no value",
            ),
            // a table header that does not close
            ("[rabbitmq\nurl = 1", "line 1, column"),
            // multi-byte characters before the error count as one column each
            ("[rabbitmq]\nurl = \"ééé\" TomlLeak1\n", "line 2, column 13"),
        ];
        for (text, want) in cases {
            let got = parse(text);
            assert!(got.contains(want), "{text:?}: {want:?} not in {got:?}");
            assert!(!got.contains("TomlLeak1"), "{text:?}: leaked in {got:?}");
            assert!(!got.contains("Leak1"), "{text:?}: leaked in {got:?}");
        }
    }

    #[test]
    fn quoted_strings_are_cut_out_of_messages() {
        let cases = [
            // one string
            (
                "invalid type: string \"pw\", expected i64",
                "invalid type: a string, expected i64",
            ),
            // an escaped quote inside
            ("string \"p\\\"w\" and more", "a string and more"),
            // two strings
            ("string \"a\" vs string \"b\"", "a string vs a string"),
            // unterminated: the rest is dropped
            ("string \"secret", "a string"),
            // nothing to cut
            ("duplicate key", "duplicate key"),
        ];
        for (input, want) in cases {
            assert_eq!(without_strings(input), want, "{input:?}");
        }
    }
}

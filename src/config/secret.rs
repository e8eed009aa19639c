//! A string that must never be printed: database and broker URLs carry
//! passwords. `Debug` and `Display` both show `***`; the value is reachable
//! only through [`Secret::expose`], which makes every use easy to audit.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An error message from a URL parser, minus the URL if the parser echoed it.
pub fn scrub(message: &str, secret: &str) -> String {
    if secret.is_empty() {
        message.to_owned()
    } else {
        message.replace(secret, "<url>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("amqp://u:hunter2@h".into());
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "amqp://u:hunter2@h");
    }

    #[test]
    fn scrub_removes_an_echoed_url() {
        assert_eq!(
            scrub("Invalid URL: 'a:pw@x'", "a:pw@x"),
            "Invalid URL: '<url>'"
        );
    }
}

//! A source's TLS to PostgreSQL: `sslmode` and `sslrootcert`, as keys or
//! as libpq's parameters in `database_url`.

use super::Validator;
use crate::tls::PgTls;

impl Validator<'_> {
    /// `sslmode` and `sslrootcert`, from the keys or from the connection
    /// string (libpq's parameters of the same names); given in both places
    /// they must agree. The default is prefer (no TLS, see `crate::tls`).
    pub(super) fn pg_tls(
        &mut self,
        k: &dyn Fn(&str) -> String,
        (mode, root): (Option<String>, Option<String>),
        (url_mode, url_root): (Option<String>, Option<String>),
    ) -> Option<PgTls> {
        let mode = self.string_opt(&k("sslmode"), mode);
        let root = self.string_opt(&k("sslrootcert"), root);
        // An error names where the value came from: its key, or the URL.
        let (mode, mode_key) = self.agree(k, "sslmode", mode, url_mode)?;
        let (root, root_key) = self.agree(k, "sslrootcert", root, url_root)?;
        let mode = match mode.as_deref() {
            None | Some("disable" | "prefer") => PgTls::Off,
            Some("require") => PgTls::Require,
            Some("verify-full") => PgTls::VerifyFull {
                ca_file: root.clone(),
            },
            Some(other) => {
                self.invalid(
                    &mode_key,
                    format!("sslmode must be \"disable\", \"prefer\", \"require\" or \"verify-full\", got {other:?}"),
                );
                return None;
            }
        };
        if root.is_some() && !matches!(mode, PgTls::VerifyFull { .. }) {
            self.invalid(
                &root_key,
                "sslrootcert only applies with sslmode = \"verify-full\"",
            );
            return None;
        }
        // Build it once now, so an unreadable CA file is a config error.
        self.check(&root_key, crate::tls::client_config(&mode).map(|_| mode))
    }

    /// A setting given as a key and in the connection string: either one,
    /// or both with the same value; with the key path to blame for it.
    /// `None` (with the error recorded) if the two differ.
    fn agree(
        &mut self,
        k: &dyn Fn(&str) -> String,
        name: &str,
        from_key: Option<String>,
        from_url: Option<String>,
    ) -> Option<(Option<String>, String)> {
        match (from_key, from_url) {
            (Some(a), Some(b)) if a != b => {
                self.invalid(
                    &k(name),
                    format!(
                        "{a:?} differs from the database_url's {name}={b:?}; give it in one place"
                    ),
                );
                None
            }
            (Some(a), _) => Some((Some(a), k(name))),
            (None, Some(b)) => Some((Some(b), k("database_url"))),
            (None, None) => Some((None, k(name))),
        }
    }
}

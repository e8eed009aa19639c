//! `capture`, `slot` and `publication`: how a source's rows come in.

use super::source::Keys;
use super::{Invalid, Validator};

/// How rows come in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureMode {
    /// Claim due rows from the table (NOTIFY and the poll interval wake
    /// the relay).
    Poll,
    /// Read committed inserts (and `outbox_emit` messages) from the
    /// write-ahead log through a logical replication slot, in commit order.
    Wal(WalCapture),
}

/// `capture = "wal"`: the slot and publication `migrate` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalCapture {
    /// `[a-z0-9_]`, at most 63 bytes (the replication command takes it
    /// unquoted).
    pub slot: String,
    pub publication: String,
}

impl CaptureMode {
    pub fn wal(&self) -> Option<&WalCapture> {
        match self {
            CaptureMode::Wal(w) => Some(w),
            CaptureMode::Poll => None,
        }
    }
}

/// `outboxd_<name>` with the name lowered to `[a-z0-9_]` (every other
/// character becomes `_`): the default slot and publication name.
pub fn default_wal_name(source: &str) -> String {
    let lowered: String = source
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("outboxd_{lowered}")
}

/// PostgreSQL identifiers (slot and publication names) are at most 63 bytes.
const MAX_IDENT_BYTES: usize = 63;

fn check_slot(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IDENT_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "{name:?} must be 1 to {MAX_IDENT_BYTES} characters of lower-case ASCII letters, digits and `_` (PostgreSQL's rule for replication slot names)"
        )))
    }
}

fn check_publication(name: &str) -> Result<(), Invalid> {
    if name.is_empty() || name.len() > MAX_IDENT_BYTES || name.contains('\0') {
        Err(Invalid::new(format!(
            "{name:?} must be 1 to {MAX_IDENT_BYTES} bytes (a PostgreSQL identifier)"
        )))
    } else {
        Ok(())
    }
}

impl Validator<'_> {
    /// `capture`, `slot` and `publication`.
    pub(super) fn capture(
        &mut self,
        k: &dyn Fn(&str) -> String,
        keys: &Keys,
        raw: &RawCapture,
    ) -> Option<CaptureMode> {
        let mode = self.string_opt(&k("capture"), raw.capture.clone());
        match mode.as_deref() {
            None | Some("poll") => {
                for (key, value) in [("slot", &raw.slot), ("publication", &raw.publication)] {
                    if value.is_some() {
                        self.invalid(&k(key), "only applies with capture = \"wal\"");
                    }
                }
                Some(CaptureMode::Poll)
            }
            Some("wal") => {
                if raw.ordering_set {
                    self.invalid(
                        &k("ordering"),
                        "does not apply with capture = \"wal\": the write-ahead log gives commit order, so every aggregate's rows go out in order",
                    );
                }
                if raw.on_park_set {
                    self.invalid(
                        &k("on_park"),
                        "does not apply with capture = \"wal\": a parked message does not hold back its aggregate (the log moves on; replay puts it back in the table, where the log sees it again)",
                    );
                }
                let default = keys.name.as_deref().map(default_wal_name);
                let slot = self
                    .string_opt(&k("slot"), raw.slot.clone())
                    .or(default.clone());
                let slot = slot.and_then(|s| self.check(&k("slot"), check_slot(&s)).map(|()| s));
                let publication = self
                    .string_opt(&k("publication"), raw.publication.clone())
                    .or(default);
                let publication = publication.and_then(|p| {
                    self.check(&k("publication"), check_publication(&p))
                        .map(|()| p)
                });
                Some(CaptureMode::Wal(WalCapture {
                    slot: slot?,
                    publication: publication?,
                }))
            }
            Some(other) => {
                self.invalid(
                    &k("capture"),
                    format!("must be \"poll\" or \"wal\", got {other:?}"),
                );
                None
            }
        }
    }
}

/// The keys that choose how rows come in, taken out of the raw source.
pub(super) struct RawCapture {
    pub(super) capture: Option<String>,
    pub(super) slot: Option<String>,
    pub(super) publication: Option<String>,
    pub(super) ordering_set: bool,
    pub(super) on_park_set: bool,
}

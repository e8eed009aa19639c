//! Our decoder for the pgoutput messages the transport hands over as raw
//! bytes (protocol version 1): Relation and Insert. Begin, Commit and
//! logical messages come decoded from the transport; Update, Delete,
//! Truncate, Type and Origin are not published to us (the publication
//! publishes inserts only) and are skipped if they come anyway.
//!
//! Columns are mapped by name from the last Relation message of each
//! relation id, which the server sends before the first change of a
//! relation in a session and again after its schema changed.

use std::collections::HashMap;

/// A change the relay cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A row inserted into a relation whose Relation message came before.
    Insert(Inserted),
    /// A Relation message (the cache is updated) or a change we skip.
    Nothing,
}

/// An inserted row: the relation's names and each column's text value
/// (`None` for NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inserted {
    pub schema: String,
    pub table: String,
    pub columns: Vec<(String, Option<String>)>,
}

impl Inserted {
    /// The text value of a column, `Err` naming it when it is missing.
    pub fn get(&self, name: &str) -> Option<&Option<String>> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message {kind:?} ends early, at byte {at}")]
    Truncated { kind: char, at: usize },
    #[error("pgoutput message {kind:?}: a string is not UTF-8")]
    NotUtf8 { kind: char },
    #[error("pgoutput Insert for relation {0}, whose Relation message never came")]
    UnknownRelation(u32),
    #[error(
        "pgoutput Insert for relation {relid} has {got} columns, its Relation message said {want}"
    )]
    ColumnCount { relid: u32, got: usize, want: usize },
    #[error(
        "pgoutput column kind {0:?} (binary values need a decoder we do not have; the relay asks for text)"
    )]
    ColumnKind(char),
    #[error("empty pgoutput message")]
    Empty,
}

#[derive(Debug, Clone)]
struct Relation {
    schema: String,
    table: String,
    columns: Vec<String>,
}

/// Decodes one session's changes; keeps that session's relations.
#[derive(Debug, Default)]
pub struct Decoder {
    relations: HashMap<u32, Relation>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one XLogData payload.
    pub fn decode(&mut self, data: &[u8]) -> Result<Change, DecodeError> {
        let (&tag, rest) = data.split_first().ok_or(DecodeError::Empty)?;
        let kind = tag as char;
        let mut r = Reader {
            bytes: rest,
            at: 1,
            kind,
        };
        match tag {
            b'R' => {
                let relid = r.u32()?;
                let schema = r.string()?;
                let table = r.string()?;
                let _replica_identity = r.u8()?;
                let n = r.u16()?;
                let mut columns = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let _flags = r.u8()?;
                    columns.push(r.string()?);
                    let _type_oid = r.u32()?;
                    let _type_modifier = r.u32()?;
                }
                self.relations.insert(
                    relid,
                    Relation {
                        schema,
                        table,
                        columns,
                    },
                );
                Ok(Change::Nothing)
            }
            b'I' => {
                let relid = r.u32()?;
                let _new = r.u8()?;
                let relation = self
                    .relations
                    .get(&relid)
                    .ok_or(DecodeError::UnknownRelation(relid))?;
                let n = r.u16()? as usize;
                if n != relation.columns.len() {
                    return Err(DecodeError::ColumnCount {
                        relid,
                        got: n,
                        want: relation.columns.len(),
                    });
                }
                let mut columns = Vec::with_capacity(n);
                for name in &relation.columns {
                    let value = match r.u8()? {
                        b'n' | b'u' => None,
                        b't' => {
                            let len = r.u32()? as usize;
                            Some(r.text(len)?)
                        }
                        other => return Err(DecodeError::ColumnKind(other as char)),
                    };
                    columns.push((name.clone(), value));
                }
                Ok(Change::Insert(Inserted {
                    schema: relation.schema.clone(),
                    table: relation.table.clone(),
                    columns,
                }))
            }
            // Update, Delete, Truncate, Type, Origin (and anything newer):
            // not ours to send.
            _ => Ok(Change::Nothing),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    kind: char,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated {
                kind: self.kind,
                at: self.at + self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        self.at += n;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated {
                kind: self.kind,
                at: self.at + self.bytes.len(),
            })?;
        let s = self.text(end)?;
        self.take(1)?;
        Ok(s)
    }

    fn text(&mut self, len: usize) -> Result<String, DecodeError> {
        let kind = self.kind;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8 { kind })
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! pgoutput bytes built by hand from the protocol's documented layout
    //! (PostgreSQL docs, "Logical Replication Message Formats").

    pub fn relation(relid: u32, schema: &str, table: &str, columns: &[&str]) -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(relid.to_be_bytes());
        for s in [schema, table] {
            b.extend(s.as_bytes());
            b.push(0);
        }
        b.push(b'd');
        b.extend((columns.len() as u16).to_be_bytes());
        for (i, c) in columns.iter().enumerate() {
            b.push(u8::from(i == 0));
            b.extend(c.as_bytes());
            b.push(0);
            b.extend(25u32.to_be_bytes()); // text
            b.extend(u32::MAX.to_be_bytes()); // typmod -1
        }
        b
    }

    pub fn insert(relid: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend(relid.to_be_bytes());
        b.push(b'N');
        b.extend((values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as u32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{insert, relation};
    use super::*;

    #[test]
    fn an_insert_after_its_relation_maps_columns_by_name() {
        let mut d = Decoder::new();
        let r = relation(
            16384,
            "public",
            "outbox",
            &["id", "aggregate_id", "payload"],
        );
        assert_eq!(d.decode(&r), Ok(Change::Nothing));
        let i = insert(16384, &[Some("7"), None, Some(r#"{"a": 1}"#)]);
        let Ok(Change::Insert(row)) = d.decode(&i) else {
            panic!("an insert");
        };
        assert_eq!(
            (row.schema.as_str(), row.table.as_str()),
            ("public", "outbox")
        );
        assert_eq!(row.get("id"), Some(&Some("7".to_owned())));
        assert_eq!(row.get("aggregate_id"), Some(&None));
        assert_eq!(row.get("payload"), Some(&Some(r#"{"a": 1}"#.to_owned())));
        assert_eq!(row.get("missing"), None);
    }

    #[test]
    fn a_schema_change_mid_stream_is_followed() {
        let mut d = Decoder::new();
        d.decode(&relation(1, "public", "outbox", &["id", "payload"]))
            .unwrap();
        d.decode(&insert(1, &[Some("1"), Some("{}")])).unwrap();
        // A column added: the server sends the Relation again before the
        // next insert; the new layout is used from then on.
        d.decode(&relation(
            1,
            "public",
            "outbox",
            &["id", "payload", "extra"],
        ))
        .unwrap();
        let Ok(Change::Insert(row)) = d.decode(&insert(1, &[Some("2"), Some("{}"), Some("x")]))
        else {
            panic!("an insert");
        };
        assert_eq!(row.get("extra"), Some(&Some("x".to_owned())));
        // An insert in the old layout is now a mismatch, not a shifted row.
        assert_eq!(
            d.decode(&insert(1, &[Some("3"), Some("{}")])),
            Err(DecodeError::ColumnCount {
                relid: 1,
                got: 2,
                want: 3
            })
        );
    }

    #[test]
    fn an_insert_before_its_relation_is_an_error() {
        let mut d = Decoder::new();
        assert_eq!(
            d.decode(&insert(9, &[Some("1")])),
            Err(DecodeError::UnknownRelation(9))
        );
    }

    #[test]
    fn truncated_and_odd_messages_are_errors_not_panics() {
        let mut d = Decoder::new();
        let r = relation(1, "public", "outbox", &["id", "payload"]);
        for cut in 1..r.len() {
            assert!(
                matches!(d.decode(&r[..cut]), Err(DecodeError::Truncated { .. })),
                "relation cut at {cut}"
            );
        }
        d.decode(&r).unwrap();
        let i = insert(1, &[Some("12"), Some("{}")]);
        for cut in 1..i.len() {
            assert!(d.decode(&i[..cut]).is_err(), "insert cut at {cut}");
        }
        assert_eq!(d.decode(&[]), Err(DecodeError::Empty));
        // binary column values are refused by name
        let mut b = insert(1, &[Some("1"), Some("{}")]);
        let kind_at = 1 + 4 + 1 + 2;
        b[kind_at] = b'b';
        assert_eq!(d.decode(&b), Err(DecodeError::ColumnKind('b')));
        // not UTF-8
        let mut bad = insert(1, &[Some("1"), Some("ab")]);
        let last = bad.len() - 1;
        bad[last] = 0xff;
        assert_eq!(d.decode(&bad), Err(DecodeError::NotUtf8 { kind: 'I' }));
    }

    #[test]
    fn updates_deletes_truncates_types_and_origins_are_skipped() {
        let mut d = Decoder::new();
        for tag in [b'U', b'D', b'T', b'Y', b'O'] {
            assert_eq!(d.decode(&[tag, 0, 0, 0, 1]), Ok(Change::Nothing));
        }
    }
}

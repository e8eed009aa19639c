//! `capture = "wal"`: rows come from the write-ahead log through a logical
//! replication slot (pgoutput) instead of claims on the table.
//!
//! | part | what it does |
//! |---|---|
//! | [`stream`] | the replication connection, behind our [`stream::WalStream`] trait |
//! | [`decode`] | our pgoutput decoder (Relation, Insert) |
//! | [`row`] | an insert or an `outbox_emit()` message as an [`crate::message::OutboxRow`] |
//! | [`ledger`] | which position the slot may move to |
//! | [`relay`] | the source's loop: publish in commit order, move the slot, delete rows |
//! | [`upkeep`] | the slot's gauges and state, and the table's backlog gauges |
//! | [`slot`] | `outboxd slot drop` |
//!
//! The broker side is the same [`crate::sink::Publisher`] the polling
//! relay uses.

pub mod decode;
pub mod ledger;
pub mod relay;
pub mod row;
pub mod slot;
pub mod stream;
pub mod upkeep;
